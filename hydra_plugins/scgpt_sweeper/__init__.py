"""Hydra takes sweepers only from the ``hydra_plugins`` package: scgpt's Optuna sweeper (scgpt/sweeper.py) under
that name. ``hydra.sweeper._target_: hydra_plugins.scgpt_sweeper.OptunaSweeper`` (conf/hydra/sweeper/optuna.yaml)."""

from scgpt.sweeper import OptunaJournalSweeper


class OptunaSweeper(OptunaJournalSweeper):
    """scgpt.sweeper.OptunaJournalSweeper as a Hydra plugin."""
