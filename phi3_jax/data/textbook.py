"""Synthetic "textbook" documents: procedural, seeded, random access by index.

Each document is a small lesson — worked arithmetic exercises, logic exercises, definitions of terms or
a Python snippet with an explanation — written for one audience. Document `i` depends only on
(seed, i), so any process can read any index without generating the ones before it, and the corpus is
identical on every machine.

A fraction of documents is deliberately degraded (missing solutions, wrong answers, garbled words,
spam lines). They carry `quality=0` and the kind of defect, which gives the quality scorers labelled
examples and gives a quality-filtered phase something real to remove.

`TextbookChatSource` turns the same exercises into tutoring conversations (chat messages) for supervised
fine-tuning, or into preference pairs (the same conversation with a correct and a wrong last answer).
"""

from __future__ import annotations

import random

from phi3_jax.data.chat_templates import chat_document, pair_document

TOPICS = ("arithmetic", "logic", "definitions", "python")
AUDIENCES = ("children", "high school students", "college students", "programmers")
DEFECTS = ("no_solution", "wrong_answer", "garbled", "spam")

# Largest operand per audience: the same lesson shape at different difficulty.
_MAX_OPERAND = {"children": 20, "high school students": 999, "college students": 99999, "programmers": 9999}
_INTRO = {
    "children": "Let's practice together! Take your time and check each step.",
    "high school students": "Work through each exercise, then compare your steps with the solution.",
    "college students": "Each exercise states the method first; verify every intermediate result.",
    "programmers": "Read each example as you would review code: state the invariant, then check it.",
}
_NAMES = ("Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena")
_RELATIONS = (("taller", "tallest", "shortest"), ("older", "oldest", "youngest"), ("faster", "fastest", "slowest"))
_CONDITIONALS = (
    ("it rains", "the ground is wet"),
    ("the switch is on", "the lamp is lit"),
    ("a number is divisible by 4", "it is even"),
    ("the program compiles", "it has no syntax errors"),
    ("a shape is a square", "it has four sides"),
)
_GLOSSARY = (
    ("sum", "the result of adding numbers together", "the sum of 3 and 4 is 7"),
    ("product", "the result of multiplying numbers", "the product of 3 and 4 is 12"),
    ("difference", "the result of subtracting one number from another", "the difference of 9 and 4 is 5"),
    ("quotient", "the result of dividing one number by another", "the quotient of 12 and 3 is 4"),
    ("remainder", "what is left over after dividing whole numbers", "17 divided by 5 leaves remainder 2"),
    ("prime number", "a whole number greater than 1 whose only divisors are 1 and itself", "7 is prime"),
    ("even number", "a whole number divisible by 2", "10 is even because 10 = 2 x 5"),
    ("factor", "a whole number that divides another exactly", "3 is a factor of 12"),
    ("multiple", "the product of a number and a whole number", "15 is a multiple of 5"),
    ("fraction", "a number that names part of a whole", "one half is written 1/2"),
    ("perimeter", "the total length around a shape", "a 3 by 4 rectangle has perimeter 14"),
    ("area", "the amount of surface a shape covers", "a 3 by 4 rectangle has area 12"),
    ("average", "the sum of values divided by how many values there are", "the average of 2, 4, 6 is 4"),
    ("variable", "a name that refers to a value", "in x = 5 the variable x refers to 5"),
    ("function", "a named block of code that takes inputs and returns an output", "len returns a length"),
    ("loop", "code that repeats while a condition holds or for each item", "for item in items repeats"),
    ("list", "an ordered collection of values", "[1, 2, 3] is a list of three numbers"),
    ("string", "a sequence of characters", "'cat' is a string of length 3"),
    ("boolean", "a value that is either True or False", "3 < 5 evaluates to True"),
    ("algorithm", "a finite list of steps that solves a problem", "long division is an algorithm"),
    ("premise", "a statement an argument assumes to be true", "'all cats are animals' can be a premise"),
    ("conclusion", "the statement an argument claims follows from its premises", "'so Tom is an animal'"),
    ("contrapositive", "for 'if P then Q', the statement 'if not Q then not P'", "it is equivalent"),
)
_SPAM = (
    "CLICK HERE to subscribe for more free worksheets!!!",
    "Best deals on calculators - buy now, limited offer!!!",
    "Follow us and share this page with your friends!!!",
)


def _arith_exercise(rng: random.Random, audience: str) -> tuple[str, str, str, int, str]:
    """One exercise: (question, worked steps, final left-hand side, answer, text after the answer)."""
    hi = _MAX_OPERAND[audience]
    op = rng.choice("+-x/" if audience != "children" else "+-")
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    if op == "+":
        width = len(str(max(a, b)))
        steps, carry = [], 0
        for da, db in zip(str(a).zfill(width)[::-1], str(b).zfill(width)[::-1]):
            total = int(da) + int(db) + carry
            steps.append(f"{da} + {db}" + (f" + {carry}" if carry else "") + f" = {total}")
            carry = total // 10
        work = "Add digit by digit from the right, carrying the tens: " + "; ".join(steps) + "."
        return f"What is {a} + {b}?", work, f"{a} + {b}", a + b, ""
    if op == "-":
        a, b = max(a, b), min(a, b)
        work = f"Check by adding back: {a - b} + {b} = {a}."
        return f"What is {a} - {b}?", work, f"{a} - {b}", a - b, ""
    if op == "x":
        b = rng.randint(11, 99)
        tens, ones = b - b % 10, b % 10
        work = (f"Split {b} into {tens} + {ones}: {a} x {tens} = {a * tens} and {a} x {ones} = {a * ones}; "
                f"then {a * tens} + {a * ones} = {a * b}.")
        return f"What is {a} x {b}?", work, f"{a} x {b}", a * b, ""
    b = rng.randint(2, 12)
    q, r = divmod(a, b)
    work = f"{b} x {q} = {b * q}, and {a} - {b * q} = {r}, which is less than {b}."
    return f"What is {a} / {b} (whole-number division)?", work, f"{a} / {b}", q, f" remainder {r}"


def _arithmetic(rng, audience, defect):
    parts = [f"Title: Arithmetic practice for {audience}", "", _INTRO[audience], ""]
    for k in range(1, rng.randint(3, 5) + 1):
        question, work, lhs, answer, suffix = _arith_exercise(rng, audience)
        if defect == "wrong_answer":
            # The stated result no longer follows from the worked steps; the heuristic scorer can catch
            # this by re-checking the final equation.
            answer += rng.choice((-1, 1)) * rng.randint(1, 9)
        parts.append(f"Exercise {k}: {question}")
        if defect != "no_solution":
            parts += [f"Solution: {work} So {lhs} = {answer}{suffix}.", f"Answer: {answer}"]
        parts.append("")
    return parts


def _logic_exercise(rng: random.Random) -> tuple[str, str, str, str]:
    """One exercise: (question, worked reasoning, answer, the other answer: a wrong one)."""
    kind = rng.randrange(3)
    if kind == 0:
        who = rng.sample(_NAMES, 3)
        rel, most, least = rng.choice(_RELATIONS)
        question = f"{who[0]} is {rel} than {who[1]}. {who[1]} is {rel} than {who[2]}. Who is the {most}?"
        work = (f"The relation '{rel} than' is transitive, so {who[0]} is {rel} than {who[2]} as well. "
                f"{who[0]} is {rel} than both others, and {who[2]} is the {least}.")
        return question, work, who[0], who[2]  # wrong: the relation read backwards
    if kind == 1:
        p, q = rng.choice(_CONDITIONALS)
        if rng.random() < 0.5:
            question = f"If {p}, then {q}. We know that {p}. What follows?"
            work = "This is modus ponens: the condition holds, so the consequence holds."
            return question, work, q[0].upper() + q[1:] + ".", f"It is not true that {q}."
        question = f"If {p}, then {q}. We know that it is not true that {q}. What follows?"
        work = "This is modus tollens: if the condition held, the consequence would hold; it does not."
        return question, work, f"It is not true that {p}.", p[0].upper() + p[1:] + "."
    vals = {v: rng.random() < 0.5 for v in "ABC"}
    inner = vals["A"] and not vals["B"]
    result = inner or vals["C"]
    question = f"Let A = {vals['A']}, B = {vals['B']}, C = {vals['C']}. Evaluate (A and not B) or C."
    work = f"not B = {not vals['B']}; A and not B = {inner}; {inner} or {vals['C']} = {result}."
    return question, work, str(result), str(not result)


def _logic(rng, audience, defect):
    parts = [f"Title: Reasoning exercises for {audience}", "", _INTRO[audience], ""]
    for k in range(1, rng.randint(2, 4) + 1):
        question, work, answer, _ = _logic_exercise(rng)
        if defect == "wrong_answer":
            answer = rng.choice(("Nothing follows.", "Both.", "It depends."))
        parts.append(f"Exercise {k}: {question}")
        if defect != "no_solution":
            parts += [f"Solution: {work}", f"Answer: {answer}"]
        parts.append("")
    return parts


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _definitions(rng, audience, defect):
    parts = [f"Title: Key terms for {audience}", "", "Learn each term, then read the example.", ""]
    terms = rng.sample(_GLOSSARY, rng.randint(3, 5))
    for term, meaning, example in terms:
        parts.append(f"Definition: {_a(term).capitalize()} is {meaning}.")
        if defect != "no_solution":
            parts.append(f"Example: {example}.")
        parts.append("")
    (term, meaning, _), (_, other_meaning, _) = rng.sample(terms, 2)
    if defect == "wrong_answer":
        meaning = other_meaning  # the answer defines a different term
    parts.append(f"Exercise: In your own words, what is {_a(term)}?")
    if defect != "no_solution":
        parts.append(f"Answer: {_a(term).capitalize()} is {meaning}.")
    return parts


def _python_snippet(rng: random.Random, kind: int) -> tuple[str, list[str], str, str]:
    """(code, explanation lines, example call, example result) for one small function."""
    seq = rng.choice(("nums", "values", "items", "data"))
    xs = [rng.randint(-9, 20) for _ in range(rng.randint(3, 6))]
    n = rng.randint(3, 9)
    word = rng.choice(("banana", "education", "python", "sequence", "rhythm", "keyboard"))
    if kind == 0:
        code = f"def total({seq}):\n    result = 0\n    for x in {seq}:\n        result += x\n    return result"
        why = ["`result` starts at 0, the sum of no numbers.", "The loop adds each element once."]
        return code, why, f"total({xs})", str(sum(xs))
    if kind == 1:
        code = "def factorial(n):\n    result = 1\n    for k in range(2, n + 1):\n        result *= k\n    return result"
        why = ["The product starts at 1, the empty product.", "`range(2, n + 1)` visits 2, 3, ..., n."]
        out = 1
        for k in range(2, n + 1):
            out *= k
        return code, why, f"factorial({n})", str(out)
    if kind == 2:
        code = "def count_vowels(text):\n    return sum(1 for ch in text if ch in 'aeiou')"
        why = ["The generator yields 1 for every vowel.", "`sum` adds those ones up."]
        return code, why, f"count_vowels({word!r})", str(sum(ch in "aeiou" for ch in word))
    if kind == 3:
        code = (f"def largest({seq}):\n    best = {seq}[0]\n    for x in {seq}[1:]:\n        if x > best:\n"
                f"            best = x\n    return best")
        why = ["`best` holds the largest value seen so far.", "Each later element replaces it only if larger."]
        return code, why, f"largest({xs})", str(max(xs))
    code = "def fibonacci(n):\n    a, b = 0, 1\n    out = []\n    for _ in range(n):\n        out.append(a)\n        a, b = b, a + b\n    return out"
    why = ["`a` and `b` are two consecutive Fibonacci numbers.", "Each step shifts the pair forward by one."]
    fib, a, b = [], 0, 1
    for _ in range(n):
        fib.append(a)
        a, b = b, a + b
    return code, why, f"fibonacci({n})", str(fib)


def _python(rng, audience, defect):
    parts = [f"Title: Reading Python code, for {audience}", "", _INTRO[audience], ""]
    for k, kind in enumerate(rng.sample(range(5), rng.randint(1, 2)), start=1):
        code, why, call, result = _python_snippet(rng, kind)
        if defect == "wrong_answer":
            result = str(rng.randint(-50, 50))
        parts += [f"Example {k}:", "```python", code, "```"]
        if defect != "no_solution":
            parts += ["Explanation: " + " ".join(why), f"Exercise: what does {call} return?", f"Answer: {result}"]
        parts.append("")
    return parts


_WRITERS = {"arithmetic": _arithmetic, "logic": _logic, "definitions": _definitions, "python": _python}


def _garble(rng: random.Random, lines: list[str]) -> list[str]:
    """Shuffle the words of most lines and scramble letters inside some words."""
    out = []
    for line in lines:
        words = line.split(" ")
        if len(words) > 2 and rng.random() < 0.8:
            rng.shuffle(words)
            words = ["".join(rng.sample(w, len(w))) if len(w) > 3 and rng.random() < 0.5 else w for w in words]
        out.append(" ".join(words))
    return out


class TextbookSource:
    """Random-access synthetic lessons (grain RandomAccessDataSource protocol).

    Args:
      num_docs: length of the corpus (documents are generated on demand; nothing is stored).
      seed: content seed: the same (seed, index) always gives the same document.
      low_quality_fraction: share of documents given one defect from DEFECTS (labelled quality=0).
    """

    def __init__(self, num_docs: int = 1_000_000, seed: int = 0, low_quality_fraction: float = 0.2):
        if num_docs <= 0:
            raise ValueError(f"num_docs must be positive, got {num_docs}")
        if not 0.0 <= low_quality_fraction <= 1.0:
            raise ValueError(f"low_quality_fraction must be in [0, 1], got {low_quality_fraction}")
        self.num_docs = int(num_docs)
        self.seed = int(seed)
        self.low_quality_fraction = float(low_quality_fraction)

    def __len__(self) -> int:
        return self.num_docs

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_docs:
            raise IndexError(f"textbook index {index} out of range [0, {self.num_docs})")
        # A string seed goes through SHA-512 in `random`, so it is stable across runs and machines
        # (unlike hash(), which is salted per process).
        rng = random.Random(f"textbook/{self.seed}/{index}")
        topic = rng.choice(TOPICS)
        audience = rng.choice(AUDIENCES)
        defect = rng.choice(DEFECTS) if rng.random() < self.low_quality_fraction else "none"
        lines = _WRITERS[topic](rng, audience, defect)
        if defect == "garbled":
            lines = _garble(rng, lines)
        elif defect == "spam":
            spam = rng.choice(_SPAM)
            for _ in range(rng.randint(2, 4)):
                lines.insert(rng.randrange(len(lines) + 1), spam)
        text = "\n".join(lines).strip() + "\n"
        return {"text": text, "topic": topic, "audience": audience, "source": "textbook",
                "quality": int(defect == "none"), "defect": defect}

    def __repr__(self) -> str:
        return f"TextbookSource(num_docs={self.num_docs}, seed={self.seed})"


_TUTOR = {
    "children": "You are a friendly tutor for children. Explain each step simply.",
    "high school students": "You are a tutor for high school students. Show the steps, then the answer.",
    "college students": "You are a tutor for college students. State the method, then verify the result.",
    "programmers": "You are a precise assistant for programmers. Reason step by step.",
}
_FOLLOW_UPS = ("Thanks! Here is another one.", "Great. Next question:", "Can you do one more?", "And this one?")


def _arith_reply(work: str, lhs: str, answer: int, suffix: str) -> str:
    return f"{work} So {lhs} = {answer}{suffix}.\nAnswer: {answer}{suffix}"


def _wrong_number(rng: random.Random, answer: int) -> int:
    """`answer` off by 1-9, never below 0 (a negative result would give itself away)."""
    delta = rng.randint(1, 9)
    return answer - delta if delta <= answer and rng.random() < 0.5 else answer + delta


def _logic_reply(work: str, answer: str) -> str:
    return f"{work}\nAnswer: {answer}"


class TextbookChatSource:
    """Random-access synthetic tutoring conversations, for supervised fine-tuning (grain
    RandomAccessDataSource protocol).

    Each conversation is an optional system message for one audience, then 1-3 exchanges: the user asks an
    arithmetic or reasoning exercise from the textbook lessons, the assistant answers with the worked
    steps and "Answer: ...". Conversation `i` depends only on (seed, i); the replies are always correct.

    With `pairs`, item i is a preference pair (`chat_templates.pair_document`): chosen is conversation i,
    rejected the same conversation whose last reply keeps the worked steps but ends on a wrong answer (an
    arithmetic result off by 1-9 in both "So ... = X" and "Answer: X"; the other answer of a reasoning
    exercise).
    """

    def __init__(self, num_docs: int = 1_000_000, seed: int = 0, pairs: bool = False):
        if num_docs <= 0:
            raise ValueError(f"num_docs must be positive, got {num_docs}")
        self.num_docs, self.seed, self.pairs = int(num_docs), int(seed), bool(pairs)

    def __len__(self) -> int:
        return self.num_docs

    def _conversation(self, index: int) -> tuple[str, list[dict], str]:
        """(audience, messages, the last reply with a wrong final answer)."""
        rng = random.Random(f"textbook_chat/{self.seed}/{index}")
        # Wrong answers draw from their own stream, so the conversations stay those of the non-pair source.
        wrong_rng = random.Random(f"textbook_chat/{self.seed}/{index}/rejected")
        audience = rng.choice(AUDIENCES)
        messages = [{"role": "system", "content": _TUTOR[audience]}] if rng.random() < 0.5 else []
        for turn in range(rng.randint(1, 3)):
            if rng.random() < 0.6:
                question, work, lhs, answer, suffix = _arith_exercise(rng, audience)
                reply = _arith_reply(work, lhs, answer, suffix)
                wrong = _arith_reply(work, lhs, _wrong_number(wrong_rng, answer), suffix)
            else:
                question, work, answer, other = _logic_exercise(rng)
                reply, wrong = _logic_reply(work, answer), _logic_reply(work, other)
            if turn:
                question = f"{rng.choice(_FOLLOW_UPS)} {question}"
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
        return audience, messages, wrong

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.num_docs:
            raise IndexError(f"textbook_chat index {index} out of range [0, {self.num_docs})")
        audience, messages, wrong = self._conversation(index)
        if self.pairs:
            doc = pair_document(messages, messages[:-1] + [{"role": "assistant", "content": wrong}])
        else:
            doc = chat_document(messages)
        return {**doc, "topic": "chat", "audience": audience, "source": "textbook_chat"}

    def __repr__(self) -> str:
        return f"TextbookChatSource(num_docs={self.num_docs}, seed={self.seed}{', pairs=True' if self.pairs else ''})"
