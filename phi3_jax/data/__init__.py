"""Data pipeline: sources, tokenizers, packing, phase mixtures, quality scoring, synthetic lessons and chats."""

from phi3_jax.data.chat_templates import CHAT_TEMPLATES, render_chat
from phi3_jax.data.config import DataSpec, default_data_config, validate_data_config
from phi3_jax.data.errors import DataError
from phi3_jax.data.mixture import PhasedIterDataset, mix_rows
from phi3_jax.data.packing import ROW_KEYS, Alignment, attention_mask, pack
from phi3_jax.data.pipeline import (eval_source_names, make_pipeline, make_pipeline_dataset,
                                    make_tokenizer_from_config, phase_schedule, source_documents)
from phi3_jax.data.quality import HeuristicScorer, LogisticScorer, QualityScorer, make_scorer, register_scorer
from phi3_jax.data.sources import (SOURCE_KINDS, ArrayRecordSource, JsonlSource, StdlibSource, TextFilesSource,
                                   TfdsSource, make_source)
from phi3_jax.data.stats import unigram_entropy
from phi3_jax.data.textbook import TextbookChatSource, TextbookSource
from phi3_jax.data.tokenizers import (PHI3_SMALL_DUMMY_IDS, PHI3_SMALL_SPECIAL_TOKENS, PHI3_SMALL_STOP_IDS,
                                      TOKENIZER_KINDS, Tokenizer, make_tokenizer, phi3_small_dummy_ids)

__all__ = [
    "CHAT_TEMPLATES", "render_chat", "DataSpec", "default_data_config", "validate_data_config", "DataError",
    "PhasedIterDataset", "mix_rows", "ROW_KEYS", "Alignment", "attention_mask", "pack", "eval_source_names",
    "make_pipeline", "make_pipeline_dataset", "make_tokenizer_from_config", "phase_schedule", "source_documents",
    "HeuristicScorer", "LogisticScorer", "QualityScorer", "make_scorer", "register_scorer", "SOURCE_KINDS",
    "ArrayRecordSource", "JsonlSource", "StdlibSource", "TextFilesSource", "TfdsSource", "make_source",
    "unigram_entropy", "TextbookSource", "TextbookChatSource", "PHI3_SMALL_DUMMY_IDS", "PHI3_SMALL_SPECIAL_TOKENS",
    "PHI3_SMALL_STOP_IDS", "TOKENIZER_KINDS", "Tokenizer", "make_tokenizer", "phi3_small_dummy_ids",
]
