"""Recipes: errors that name the key and the valid ones, and every shipped recipe loads."""

import pytest

from dopd_vl.errors import ConfigError
from dopd_vl.training.config import load_config

from conftest import REPO


# ------------------------------------------------------------------------------------ configs
def test_config_errors_name_the_key_and_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"objective\.topk.*top_k"):
        load_config(REPO / "configs" / "tiny_text.yaml", ["objective.topk=5"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("student: {name_or_path: x}\nmax_step: 3\n")
    with pytest.raises(ConfigError, match=r"max_step.*max_steps"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"max_steps must be of type int"):
        load_config(REPO / "configs" / "tiny_text.yaml", ["max_steps=ten"])
    with pytest.raises(ConfigError, match=r"optim\.lr must be of type float"):
        load_config(REPO / "configs" / "tiny_text.yaml", ["optim.lr=fast"])
    config = load_config(
        REPO / "configs" / "tiny_text.yaml",
        ["optim.lr=1e-5", "max_steps=7", "lora.enabled=true", "objective.beta_light=0.5"],
    )
    assert (config.optim.lr, config.max_steps, config.lora.enabled, config.objective.beta_light) == (1e-5, 7, True, 0.5)


def test_every_recipe_loads():
    for path in sorted((REPO / "configs").glob("**/*.yaml")):
        if "accelerate" not in path.parts:
            load_config(path)
