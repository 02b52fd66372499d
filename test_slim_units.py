"""Units that both drivers share: resume_from (load, check, restore, W&B plan) and exit_when_stopped."""
import signal

import pytest
import torch
import torch.nn as nn

import wbflow


def _saved_run(path, **config):
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    state = wbflow.checkpoint_state({"model": model, "step": 7}, config=config, driver="train",
                                    wandb_run_id="abc", wandb_last_act=False)
    return model, wbflow.save_checkpoint(state, path)


def test_resume_from_restores_state_and_rng_and_plans_a_new_run_after_a_checkpoint_that_was_not_the_last_act(tmp_path):
    model, path = _saved_run(tmp_path / "last.pt", lr=0.1)
    drawn = torch.rand(1)  # the RNG as it was when the checkpoint was taken
    state = {"model": nn.Linear(2, 1), "step": 0}
    saved, (run_id, resumed_from, plan) = wbflow.resume_from(str(path), state, program="train.py", driver="train",
                                                             expected={"lr": 0.1})
    assert state["step"] == 7 and torch.equal(state["model"].weight, model.weight)
    assert torch.equal(torch.rand(1), drawn) and saved["wandb_run_id"] == "abc"
    assert run_id is None and resumed_from == {"run_id": "abc", "step": 7, "checkpoint": str(path)} and "new run" in plan


def test_resume_from_refuses_another_config_before_touching_the_state(tmp_path):
    _, path = _saved_run(tmp_path / "last.pt", lr=0.1)
    state = {"model": nn.Linear(2, 1), "step": 0}
    weight = state["model"].weight.detach().clone()
    with pytest.raises(SystemExit, match=r"^train\.py: --resume .*last\.pt: trained with lr 0\.1, this run has 0\.2 "
                                         r"\(keep it\)$"):
        wbflow.resume_from(str(path), state, program="train.py", driver="train", expected={"lr": 0.2},
                           hints={"lr": " (keep it)"})
    assert state["step"] == 0 and torch.equal(state["model"].weight, weight)


def test_resume_from_names_a_missing_key_with_its_own_hint_apart_from_a_changed_setting(tmp_path):
    _, path = _saved_run(tmp_path / "best.pt", optimizer="adam")
    state = {"model": nn.Linear(2, 1), "optimizer": None, "step": 0}
    with pytest.raises(SystemExit, match=r"lacks optimizer \(weights only\)$"):
        wbflow.resume_from(str(path), state, program="p", driver="train", expected={"optimizer": "adam"},
                           hints={"optimizer": " (same optimizer)"}, missing_hints={"optimizer": " (weights only)"})


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
def test_exit_when_stopped_ends_in_one_line_with_128_plus_the_signal(capsys, number):
    with pytest.raises(SystemExit) as stopped:
        with wbflow.exit_when_stopped("eval.py", "--eval") as stop:
            signal.raise_signal(number)  # the handler sets the stop; the block goes on to its end
            assert stop.is_set()
    assert stopped.value.code == 128 + number
    assert capsys.readouterr().err == f"eval.py: --eval stopped by {signal.Signals(number).name}; nothing was saved\n"


def test_exit_when_stopped_turns_a_second_signal_into_the_same_line(capsys):
    with pytest.raises(SystemExit) as stopped:
        with wbflow.exit_when_stopped("eval.py", "pair generation", "run it again") as stop:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)  # a stop that will not wait: KeyboardInterrupt
            raise AssertionError("not reached")
    assert stopped.value.code == 128 + signal.SIGTERM and stop.signal == signal.SIGTERM
    assert capsys.readouterr().err == "eval.py: pair generation stopped by SIGTERM; run it again\n"


def test_exit_when_stopped_lets_work_that_was_not_stopped_finish():
    with wbflow.exit_when_stopped("eval.py", "--eval") as stop:
        result = 3
    assert result == 3 and not stop.is_set()
