"""The default recipe as a new user runs it: `sparsetron train tiny`, unchanged but for its folder.

About two and a half minutes on 2 CPU cores, so its time-out is well above the suite's 600 s
default: a loaded host slows it, and only a hang should fail it. Its target: the final eval loss
is at most 60% of the eval loss at step 0.
"""

import pytest

from sparsetron.train.config_io import load_job_config
from sparsetron.train.trainer import Trainer


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_tiny_final_eval_loss_is_at_most_60_percent_of_the_initial(tmp_path):
    job = load_job_config("tiny", [f"trainer.run_dir={tmp_path}", "metrics.console=none"])
    result = Trainer(job).run()
    assert result.step == job.trainer.steps
    initial, final = result.eval_losses[0], result.eval_losses[job.trainer.steps]
    assert final <= 0.6 * initial, (initial, final)
