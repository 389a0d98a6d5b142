"""The own-data configs (folder_example.yaml for Conv-4 MAML, configs/folder/ for the other three
systems) take the natural-image settings of their mini-ImageNet counterparts, not Omniglot's."""

from pathlib import Path

import pytest

from fsl_dist.config import default_run_dir, load_config
from fsl_dist.trained import build_run_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SYSTEMS = {"cnn_maml": CONFIGS / "folder_example.yaml",
           **{p.stem: p for p in sorted((CONFIGS / "folder").glob("*.yaml"))}}


def test_the_four_systems_are_there_with_their_own_run_folders():
    assert set(SYSTEMS) == {"cnn_maml", "cnn_boil", "resnet_maml", "resnet_boil"}
    folders = {default_run_dir(load_config(p)) for p in SYSTEMS.values()}
    assert len(folders) == 4 and not folders & {default_run_dir(load_config(CONFIGS / f"{s}.yaml"))
                                                for s in SYSTEMS}


def inner_settings(cfg):
    return (cfg.model.name, cfg.model.width, cfg.algorithm.name, cfg.algorithm.inner_steps,
            cfg.algorithm.inner_lr, cfg.eval.inner_steps, cfg.optim.lr, cfg.algorithm.first_order)


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_each_system_has_its_mini_imagenet_inner_loop_on_folder_shards(system):
    cfg = load_config(SYSTEMS[system])
    paper = load_config(CONFIGS / "miniimagenet" / f"{system}_5w5s.yaml")
    assert inner_settings(cfg) == inner_settings(paper)
    assert (cfg.data.dataset, cfg.data.shards, cfg.data.rotate) == ("folder", "shards/my-folder",
                                                                    False)
    assert (cfg.task.n_way, cfg.task.k_shot, cfg.task.q_query) == (5, 5, 5)
    assert cfg.train.steps % cfg.train.eval_every == 0  # the last step is validated
    model = build_run_model(cfg, {"in_channels": 3, "image_size": 84})
    assert model.classifier.out_features == 5


def test_a_users_config_inherits_a_shipped_one_by_name_but_not_its_run_name(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("inherit: folder/cnn_boil\nmodel:\n  width: 16\n")
    cfg = load_config(mine)
    assert (cfg.name, cfg.algorithm.name, cfg.model.width) == ("mine", "boil", 16)
    assert cfg.algorithm.inner_lr == load_config(SYSTEMS["cnn_boil"]).algorithm.inner_lr
