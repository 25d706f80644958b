"""actcomp finetune --fit and plan --fit: the whole step within a device total, a resumed run
with the levers it was fitted with, and the settings that cannot go together."""

import functools
import json

import pytest
import torch

from actcomp.app import finetune
from actcomp.app.cli import main
from actcomp.app.finetune import FinetuneConfig, load_checkpoint, run_finetune


class Interrupted(Exception):
    pass


def stop_after_first(done):
    if done == 1:
        raise Interrupted


# 16 px, batch 128: plain's device total is 29 MiB, so 8 MiB takes levers (and the runs stay short)
FIT_RUN = FinetuneConfig(size=16, layers="all", fit="8MiB", freeze_batchnorm=True, epochs=2, batch_size=128, optimizer="adam", lr=3e-3)


def test_a_fitted_run_resumes_with_its_levers_to_the_uninterrupted_weights(tmp_path, monkeypatch):
    metrics = run_finetune(FIT_RUN, tmp_path / "straight", progress=False)
    assert all(0 < row["device_total_bytes"] <= 8 * 2**20 for row in metrics)
    report = (tmp_path / "straight" / "fit.txt").read_text()
    assert "chosen:" in report and "budget 8.0 MiB" in report
    levers = load_checkpoint(tmp_path / "straight" / "checkpoint.pt", torch.device("cpu"))["fit"]
    assert levers["micro_batches"] > 1 or levers["recompute"] or levers["step_in_backward"] or levers["compression"]
    # fit picks the fastest combination that fits, by measured time, so a second search may pick
    # another; the interrupted run is fitted with the straight run's levers to compare like with like
    fitted_as_straight = functools.partial(finetune.fit, levers=levers)
    monkeypatch.setattr(finetune, "fit", lambda *args, levers=None, **kwargs: fitted_as_straight(*args, **kwargs))
    with pytest.raises(Interrupted):
        run_finetune(FIT_RUN, tmp_path / "broken", progress=False, after_epoch=stop_after_first)
    run_finetune(FIT_RUN, tmp_path / "broken", resume=True, progress=False)
    broken = load_checkpoint(tmp_path / "broken" / "checkpoint.pt", torch.device("cpu"))["fit"]
    assert broken == levers
    straight = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    resumed = torch.load(tmp_path / "broken" / "model.pt", weights_only=True)
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def test_plan_fit_prints_the_report_and_writes_the_levers(tmp_path, capsys):
    out = tmp_path / "fit.json"
    assert main(["plan", "--fit", "3MiB", "--size", "16", "--layers", "all", "--batch-size", "32", "--freeze-batchnorm", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "chosen:" in printed and "plain" in printed
    written = json.loads(out.read_text())
    assert written["budget"] == "3MiB" and set(written["levers"]) == {"micro_batches", "recompute", "step_in_backward", "compression", "state_dtype"}


@pytest.mark.parametrize("argv,message", [
    (["finetune", "--fit", "6MiB", "--budget", "1MiB"], "not both"),
    (["finetune", "--freeze-batchnorm"], "give --fit too"),
    (["plan", "--fit", "lots"], "budget must be"),
])
def test_bad_fit_settings_are_one_line(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path / "out")] if argv[0] == "finetune" else argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_step_measured_over_its_budget_is_one_line(capsys, monkeypatch):
    from actcomp.app import cli
    from actcomp.memory.fit import BudgetExceededError

    def over_budget(args):
        raise BudgetExceededError("the fitted step's measured device total 9.0 MiB exceeds the budget 8.0 MiB")

    parser = cli.build_parser()
    commands = next(a for a in parser._actions if a.dest == "command")
    commands.choices["finetune"].set_defaults(run=over_budget)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    assert cli.main(["finetune", "--fit", "8MiB"]) == 2
    err = capsys.readouterr().err
    assert "exceeds the budget 8.0 MiB" in err and err.count("\n") == 1 and "Traceback" not in err
