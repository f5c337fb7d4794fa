"""`train.objective='dpo'` end to end: from an SFT run's weights, on textbook_chat pairs, resumed exactly."""
import numpy as np
import pytest

from train_helpers import load_config, losses

from phi3_jax.checkpoint import CheckpointError
from phi3_jax.train import run


def _dpo(steps):
    c = load_config("tiny", "dpo,test")
    c.train.steps, c.train.schedule, c.train.warmup_steps = steps, "constant", 1
    c.train.eval_every, c.train.eval_steps, c.train.checkpoint_every = 2, 1, 2
    c.train.lr = 3e-3
    c.mesh.fsdp = 2
    return c


@pytest.mark.slow
def test_dpo_from_sft_weights_logs_accuracy_and_resumes_exactly(tmp_path):
    sft = load_config("tiny", "sft,test")
    sft.train.steps = 2
    run(sft, str(tmp_path / "sft"))

    full = run(_dpo(4), str(tmp_path / "full"), init_from=str(tmp_path / "sft"))
    loss = losses(tmp_path / "full")
    # The reference is the weights the run starts from: the first step's policy is the reference.
    np.testing.assert_allclose(loss[1], np.log(2.0), rtol=1e-5)
    assert set(losses(tmp_path / "full", "accuracy")) == {1, 2, 3, 4}
    assert full.eval_accuracy is not None and 0.0 <= full.eval_accuracy <= 1.0
    assert set(losses(tmp_path / "full", "eval_accuracy")) == {0, 2, 4}  # 0: tiny:dpo sets train.eval_on_start
    np.testing.assert_allclose(losses(tmp_path / "full", "eval_loss")[0], np.log(2.0), rtol=1e-5)
    # The implicit rewards start at 0 (policy = reference) and move apart as it learns the preference.
    chosen, rejected = losses(tmp_path / "full", "reward_chosen"), losses(tmp_path / "full", "reward_rejected")
    assert set(chosen) == set(rejected) == {1, 2, 3, 4} and abs(chosen[1]) < 1e-3 and abs(rejected[1]) < 1e-3
    assert chosen[4] - rejected[4] > 0 and set(losses(tmp_path / "full", "eval_reward_chosen")) == {0, 2, 4}

    run(_dpo(2), str(tmp_path / "part"), init_from=str(tmp_path / "sft"))
    resumed = run(_dpo(4), str(tmp_path / "part"), init_from=str(tmp_path / "sft"))
    assert resumed.step == 4
    part = losses(tmp_path / "part")
    for s in (3, 4):  # the reference weights come back from the checkpoint: the same losses
        np.testing.assert_allclose(part[s], loss[s], rtol=1e-6)
    np.testing.assert_allclose(resumed.eval_accuracy, full.eval_accuracy)

    # The next-token objective cannot resume a DPO checkpoint: one error naming the field.
    lm = _dpo(6)
    lm.train.objective = "lm"
    with pytest.raises(CheckpointError, match="train.objective"):
        run(lm, str(tmp_path / "part"))
