"""The flags of `adapterd serve` come from the config dataclasses' fields: every flag has its
help, the defaults are the dataclasses' own, and each flag sets its field."""

from __future__ import annotations

import argparse
from pathlib import Path

from adapterd.__main__ import build_parser
from adapterd.config import Config, ModelConfig, ServerConfig, add_serve_flags


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_serve_flags(parser)
    return parser


def test_every_flag_has_help_and_the_defaults_are_the_dataclasses():
    actions = [a for a in _serve_parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) > 50
    assert all(a.help for a in actions), [a.option_strings for a in actions if not a.help]
    assert Config.from_args(build_parser().parse_args(["serve"])) == Config()


def test_each_flag_sets_its_field(tmp_path):
    args = build_parser().parse_args([
        "serve", "--port", "0", "--port-file", str(tmp_path / "port"), "--grace-period", "5",
        "--no-quantize", "--no-malloc-tuning", "--max-input-tokens", "10", "--engine", "padded",
        "--registry-refresh", "0.5", "--jobs-dir", str(tmp_path / "jobs"), "--http-port", "0",
    ])
    config = Config.from_args(args)
    assert config.server == ServerConfig(port=0, port_file=tmp_path / "port", grace_period_s=5.0)
    assert config.model == ModelConfig(quantization="none", malloc_tuning=False)
    assert config.scheduler.max_input_tokens == 10 and config.engine.kind == "padded"
    assert config.registry.refresh_s == 0.5 and config.http.port == 0
    assert config.training.jobs_dir == tmp_path / "jobs" and isinstance(config.training.jobs_dir, Path)
