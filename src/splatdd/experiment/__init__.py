"""Experiments as declared objects: a typed config, shipped presets, and one :func:`run`.

::

    from splatdd.experiment import load_config, run
    cfg = load_config("fmnist-main").with_overrides(["iterations=20", "eval.runs=1"])
    result = run(cfg)                    # distils, evaluates, writes results.json + config.toml
    print(result.after)                  # one row per evaluation model

See docs/experiments.md.
"""
from splatdd.experiment.config import (ConfigError, DatasetConfig, EvalConfig, ExperimentConfig,
                                       load_config)
from splatdd.experiment.presets import PresetInfo, list_presets, load_preset, preset_names
from splatdd.experiment.run import RunResult, run

__all__ = ["ConfigError", "DatasetConfig", "EvalConfig", "ExperimentConfig", "load_config",
           "PresetInfo", "list_presets", "load_preset", "preset_names", "RunResult", "run"]
