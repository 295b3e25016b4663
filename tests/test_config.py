"""The Hydra tree composes, validates, and matches the committed params.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from vlaops.cli import main
from vlaops.config import Config, compose, flatten, load_config, load_params, to_container, validate
from vlaops.errors import VlaopsError

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def test_params_yaml_is_the_composed_default():
    composed = OmegaConf.to_container(compose([], CONF), resolve=True)
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == composed


def test_dvc_composes_the_same_params(tmp_path):
    """DVC's own Hydra composition (what `dvc exp run -S` runs) gives the same params.yaml."""
    from dvc.utils.hydra import compose_and_dump

    out = tmp_path / "params.yaml"
    compose_and_dump(out, str(CONF), None, "config", str(ROOT), ["train.max_steps=7"])
    dumped = yaml.safe_load(out.read_text())
    expected = OmegaConf.to_container(compose(["train.max_steps=7"], CONF), resolve=True)
    assert dumped == expected
    assert load_params(out).train.max_steps == 7


def test_composed_default_fills_every_schema_key():
    """The YAML names every key the schema has, so params.yaml shows the whole recipe."""
    composed = OmegaConf.to_container(compose([], CONF), resolve=True)
    schema = to_container(validate(compose([], CONF), "conf"))
    assert composed == schema


def _same(value, default) -> bool:
    """Equal and of the same type, except an int where the schema has a float (data.control_hz is
    ${sim.control_hz}, an int; the schema turns it into 30.0)."""
    same_type = type(value) is type(default) or (type(value), type(default)) == (int, float)
    return same_type and value == default


def test_composed_default_equals_the_structured_defaults():
    """conf/ is the source of the values in force; the dataclass defaults (what code that builds a
    component directly gets) must say the same, value for value, in every group."""
    composed = flatten(OmegaConf.to_container(compose([], CONF), resolve=True))
    defaults = flatten(to_container(Config()))
    assert set(composed) == set(defaults)
    differ = {k: (composed[k], defaults[k]) for k in composed if not _same(composed[k], defaults[k])}
    assert differ == {}, f"conf/ value vs dataclass default: {differ}"


def test_ingest_defaults_to_what_the_simulator_records(tmp_path):
    """data.raw_dir, data.topics and data.control_hz follow the simulator by interpolation, resolved in
    the params.yaml that DVC's own composition writes, so ingest keeps depending on collect."""
    from dvc.utils.hydra import compose_and_dump

    cfg = load_config([], CONF)
    assert cfg.data.raw_dir == cfg.paths.collect_dir
    assert {k: v for k, v in vars(cfg.data.topics).items() if k != "task"} == vars(cfg.sim.topics)
    assert cfg.data.control_hz == cfg.sim.control_hz and isinstance(cfg.data.control_hz, float)
    out = tmp_path / "params.yaml"
    compose_and_dump(
        out,
        str(CONF),
        None,
        "config",
        str(ROOT),
        ["paths.collect_dir=elsewhere", "sim.topics.rgb_static=/cam", "sim.control_hz=15"],
    )
    params = load_params(out)
    assert (params.data.raw_dir, params.data.topics.rgb_static, params.data.control_hz) == ("elsewhere", "/cam", 15.0)
    assert "${" not in out.read_text()
    # a real rig overrides them directly
    own = load_config(["data.raw_dir=/recordings", "data.topics.rgb_static=/my/cam", "data.control_hz=12.5"], CONF)
    assert (own.data.raw_dir, own.data.topics.rgb_static, own.data.control_hz, own.sim.control_hz) == (
        "/recordings",
        "/my/cam",
        12.5,
        30,
    )


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=lora"],
        ["experiment=cpu_long"],
        ["experiment=lookup"],
        ["experiment=lookup_long"],
        ["experiment=robovlms_kosmos2", "model.pretrained_dir=/weights/kosmos-2"],
        ["model=kosmos2", "model.pretrained_dir=/weights/kosmos-2"],
        ["sim.storage=mcap", "data.on_bad_input=quarantine"],
    ],
)
def test_every_group_option_validates(overrides):
    cfg = load_config(overrides, CONF)
    assert cfg.model.window_size == 8


def test_experiment_changes_what_it_says():
    cfg = load_config(["experiment=lora"], CONF)
    assert cfg.train.train_setup.lora_enable and cfg.train.train_setup.freeze_backbone
    cfg = load_config(["experiment=robovlms_kosmos2", "model.pretrained_dir=/w"], CONF)
    assert cfg.train.learning_rate == pytest.approx(2e-5) and cfg.model.lstm_hidden_size == 1024
    assert cfg.model.lstm_num_layers == 4 and cfg.model.arm_gripper_loss_ratio == pytest.approx(0.01)
    assert cfg.model.chunk_loss_decay == 1.0 and cfg.model.pad_history is False
    cfg = load_config(["experiment=cpu_long"], CONF)
    assert cfg.train.max_steps == 3000 and cfg.model == load_config([], CONF).model
    cfg, default = load_config(["experiment=lookup"], CONF), load_config([], CONF)
    assert cfg.model.tiny.text_layers == 4 and cfg.model.aux_robot_dims == default.model.aux_robot_dims
    assert (cfg.sim.episodes_per_task, cfg.train.max_steps) == (30, 3000)
    assert {**cfg.train.__dict__, "max_steps": default.train.max_steps} == default.train.__dict__
    long = load_config(["experiment=lookup_long"], CONF)  # lookup, on twice the demos for twice the steps
    assert long.model == cfg.model and (
        long.sim.episodes_per_task,
        long.sim.max_attempts_per_task,
        long.train.max_steps,
    ) == (60, 120, 6000)


def test_kosmos2_without_weights_dir_names_the_key():
    with pytest.raises(VlaopsError, match="pretrained_dir"):
        load_config(["model=kosmos2"], CONF)


def test_the_tiny_default_fine_tunes_what_pretrain_writes():
    """Every recipe starts from the pretrained tiny Kosmos-2 (paths.pretrained_dir, the pretrain stage's
    output); model.pretrained_dir=null is the random-weights ablation; the real weights need their own dir."""
    cfg = load_config([], CONF)
    assert (cfg.model.backbone, cfg.model.pretrained_dir) == ("tiny", cfg.paths.pretrained_dir)
    moved = load_config(["paths.pretrained_dir=elsewhere/pretrained"], CONF)
    assert moved.model.pretrained_dir == "elsewhere/pretrained"
    assert load_config(["model.pretrained_dir=null"], CONF).model.pretrained_dir is None
    for recipe in ("lora", "cpu_long", "lookup", "lookup_long"):
        assert load_config([f"experiment={recipe}"], CONF).model.pretrained_dir == cfg.paths.pretrained_dir
    assert load_config(["model=kosmos2", "model.pretrained_dir=/w"], CONF).model.pretrained_dir == "/w"


def test_misspelt_override_names_the_key():
    with pytest.raises(VlaopsError, match="train.lerning_rate"):
        load_config(["train.lerning_rate=0.1"], CONF)
    with pytest.raises(VlaopsError, match="train.lerning_rate' does not exist"):
        load_config(["+train.lerning_rate=0.1"], CONF)


def test_misspelt_key_in_params_file_names_file_and_key(tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"]["gradient_clip_vall"] = 1.0
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(VlaopsError, match=r"params.yaml: config key 'train.gradient_clip_vall' does not exist"):
        load_params(path)


def test_wrong_type_and_bad_value_are_errors():
    with pytest.raises(VlaopsError, match="train.max_steps"):
        load_config(["train.max_steps=many"], CONF)
    with pytest.raises(VlaopsError, match="on_bad_input"):
        load_config(["data.on_bad_input=ignore"], CONF)


def test_cli_prints_one_line_and_exits_1(tmp_path, capsys):
    assert main(["ingest", f"data.raw_dir={tmp_path}/missing", "--config-dir", str(CONF)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and "data.raw_dir" in err[0]


def test_cli_params_check(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["params", "--check"]) == 0
    stale = tmp_path / "params.yaml"
    stale.write_text("seed: 1\n")
    assert main(["params", "--check", "--params", str(stale)]) == 1


def test_cli_cfg_job_prints_the_composed_config_and_runs_nothing(tmp_path, capsys):
    out_dir = tmp_path / "never-written"
    assert (
        main(["train", "--cfg", "job", "train.max_steps=7", f"paths.model_dir={out_dir}", "--config-dir", str(CONF)])
        == 0
    )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["max_steps"] == 7
    assert printed["model"]["window_size"] == load_config([], CONF).model.window_size
    assert not out_dir.exists()


def test_cli_help_lists_config_groups_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help", "--config-dir", str(CONF)])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "experiment: calvin_d, cpu_long, lookup, lookup_long, lora, robovlms_kosmos2" in help_text
    assert "model: kosmos2, tiny" in help_text
