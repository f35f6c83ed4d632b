"""`python -m kvbench [overrides]` — the Hydra app. `-m` sweeps (multirun).

Exit status: 0 when every run ended ok (or was complete already), 1 when a run failed (its record says
`error` or `oom`, fresh or found from before), 2 for bad input only, 130 on Ctrl-C. A sweep runs every
job, then lists the failed ones, whichever launcher ran them: each job also writes how it ended into its
own Hydra folder (`outcome.json`), which the launching process reads when the jobs ran elsewhere (joblib
workers, SLURM nodes); a job that left none counts as failed. (Where a job's process dies, killed or out
of time, the launcher itself raises in the launching process: the command ends with its error, exit 1.)
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from kvbench.config import EarlyChecks, SweepFolder
from kvbench.errors import ConfigError, report
from kvbench.records import read_record, write_json_atomic
from kvbench.run import RETRY_HINT, run

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BAD_INPUT = "bad input"
NO_OUTCOME = "no outcome"  # a sweep job whose process ended without writing how its job ended
OUTCOME_FILE = SweepFolder.OUTCOME_FILE


@dataclass
class Outcome:
    """How one job ended: the record's status, or `bad input` (then there is no run directory)."""

    job: str  # the job's overrides, naming a run that has no directory
    status: str
    directory: Path | None
    error: str


def job(cfg: DictConfig) -> Outcome:
    """One Hydra job. Bad input ends this job only: in a sweep the other jobs still run."""
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    names = {group: choices[group] for group in ("model", "method", "task") if group in choices}
    overrides = " ".join(hydra_cfg.overrides.task)
    try:
        directory = run(cfg, names)
    except ConfigError as error:
        if cfg.kvbench.debug:
            raise
        report(error)
        return Outcome(overrides, BAD_INPUT, None, str(error))
    record = read_record(directory)
    assert record is not None  # `run` returns only once the record exists
    return Outcome(overrides, record["status"], directory, record.get("error") or "")


def save_outcome(outcome: Outcome, folder: Path) -> None:
    write_json_atomic(
        folder / OUTCOME_FILE, {**asdict(outcome), "directory": outcome.directory and str(outcome.directory)}
    )


def read_outcomes(sweep_folder: Path, jobs: int) -> list[Outcome]:
    """How the jobs of a sweep that ran in other processes ended, from their folders' `outcome.json`; with
    `jobs` known, each job number without one is a failure (`NO_OUTCOME`) pointing at its folder."""
    saved = {}
    for path in sweep_folder.glob(f"*/{OUTCOME_FILE}"):
        fields = json.loads(path.read_text())
        directory = fields.pop("directory")
        saved[path.parent.name] = Outcome(**fields, directory=directory and Path(directory))
    said = "its process ended without saying how (killed, or out of time?); its Hydra folder"
    missing = [
        Outcome(f"job {number}", NO_OUTCOME, None, f"{said}: {sweep_folder / str(number)}")
        for number in range(jobs)
        if str(number) not in saved
    ]
    return [*saved.values(), *missing]


def exit_status(outcomes: list[Outcome]) -> int:
    """0 if all ok; 2 if the only failures are bad input; else 1. Several jobs: failures listed on stderr."""
    failed = [outcome for outcome in outcomes if outcome.status != "ok"]
    if not failed:
        return 0
    if len(outcomes) > 1:
        lines = [f"kvbench: {len(failed)} of {len(outcomes)} runs failed:"]
        for outcome in failed:
            where = outcome.directory or outcome.job
            lines.append(f"  {outcome.status}: {where} ({outcome.error})")
        if any(outcome.directory for outcome in failed):
            lines.append(f"pass {RETRY_HINT} to retry the failed runs")
        print("\n".join(lines), file=sys.stderr)
    return 2 if all(outcome.status == BAD_INPUT for outcome in failed) else 1


def interrupted(outcomes: list[Outcome]) -> str:
    finished = sum(outcome.directory is not None for outcome in outcomes)
    return (
        f"kvbench: interrupted; {finished} finished run(s) are saved, the run in progress left no record: "
        "rerun the same command to resume (finished runs are skipped)"
    )


# A plain `method.KEY=VALUE` (or task.): the keys a method or task takes depend on which one is chosen.
CHOICE_DEPENDENT_KEY = re.compile(r"^(method|task)\.([A-Za-z_]\w*)[\w.]*=")
CHOICE_NAMES = re.compile(r"[\w-]+(,[\w-]+)*")  # a group's choice, or a plain list of them


def set_or_add(arguments: list[str]) -> list[str]:
    """The command line with a plain `method.KEY=VALUE` or `task.KEY=VALUE` as `++` (set, or add) where a
    config Hydra checks it against lacks KEY: the default method's or task's (in a sweep Hydra composes the
    defaults with the command line's other overrides first: `-m method=kivi,rtn method.bits=4` failed on
    snapkv's config, which has no `bits`) or a chosen one's (`method.budgte=128` failed in a message naming
    no key it could be). With `++` the key reaches kvbench's own check (`config.build_dataclass`), which
    refuses a key the chosen method or task lacks, naming it and the keys it takes, before any model loads
    (in a sweep, for every job before any runs: `EarlyChecks`). A key every such config has stays plain: a
    sweep config's `hydra.sweeper.params` and the command line then still set one key (Hydra tells keys apart
    by their prefix, so `++method.budget` would sweep beside `method.budget`, not replace it)."""
    groups = {match.group(1) for match in map(CHOICE_DEPENDENT_KEY.match, arguments) if match}
    shared = {group: keys_every_choice_has(group, arguments) for group in groups}
    rewritten = []
    for argument in arguments:
        match = CHOICE_DEPENDENT_KEY.match(argument)
        keys = shared.get(match.group(1)) if match else None
        rewritten.append(f"++{argument}" if match and (keys is None or match.group(2) not in keys) else argument)
    return rewritten


def keys_every_choice_has(group: str, arguments: list[str]) -> set[str] | None:
    """The top-level keys that the default config of `group` and every one the command line chooses all have;
    None where a choice is not a plain list of names of this config folder (a glob, `choice(...)`, another
    `--config-dir`'s): then every key of the group is set or added."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    given = [argument.split("=", 1)[1] for argument in arguments if argument.startswith(f"{group}=")]
    if given and not CHOICE_NAMES.fullmatch(given[-1]):  # the last one is Hydra's
        return None
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            default = str(compose("config", return_hydra_config=True).hydra.runtime.choices[group])
            names = {default, *(given[-1].split(",") if given else [])}
            return set.intersection(*(set(compose("config", [f"{group}={name}"])[group]) for name in names))
    except (HydraException, ValueError):  # ValueError: Hydra already initialized (a caller composing its own)
        return None


def main() -> None:
    sys.argv[1:] = set_or_add(sys.argv[1:])
    # This invocation's jobs: Hydra's basic launcher calls `app` once per job, in this process. A launcher
    # that runs jobs in other processes (joblib, submitit) leaves this empty: their folders say how they ended.
    outcomes: list[Outcome] = []

    @hydra.main(version_base=None, config_path=str(CONFIG_DIR), config_name="config")
    def app(cfg: DictConfig) -> None:
        outcome = job(cfg)
        outcomes.append(outcome)
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode == RunMode.MULTIRUN:
            save_outcome(outcome, Path(hydra_cfg.runtime.output_dir))

    EarlyChecks.composed = False
    SweepFolder.folder = None
    try:
        app()
        if not outcomes and SweepFolder.folder is not None:
            outcomes = read_outcomes(SweepFolder.folder, SweepFolder.jobs)
    except SystemExit as exited:
        # Hydra exits 1 on a command line it cannot compose (an unknown method, a key the config lacks), having
        # printed why, before its callbacks run: bad input, which kvbench reports as 2.
        sys.exit(2 if exited.code == 1 and not EarlyChecks.composed else exited.code)
    except KeyboardInterrupt:
        print(interrupted(outcomes), file=sys.stderr)
        sys.exit(130)
    sys.exit(exit_status(outcomes))


if __name__ == "__main__":
    main()
