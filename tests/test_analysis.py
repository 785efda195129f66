"""Routing analysis (hand-computed toy routings), plots, and the routing-strategy comparison."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest
from flax import nnx

from moe_jax import analysis, moe
from moe_jax.analysis import compare, plots
from moe_jax.commands import common
from moe_jax.routing.plan import RoutingPlan

from configs import compare_routers  # noqa: I100  (the package `common` registers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "configs/compare_routers.py:quick"


def test_class_expert_matrix_sums_routing_mass_per_class_and_masks_padding():
  labels = np.array([0, 0, 1, 2, 2])
  load = np.array([[1, 0], [0.5, 0.5], [0, 1], [0.25, 0.75], [1, 0]])
  mask = np.array([1, 1, 1, 1, 0])  # the last example is padding
  got = analysis.class_expert_matrix(labels, load, num_classes=3, mask=mask)
  np.testing.assert_allclose(got, [[1.5, 0.5], [0, 1], [0.25, 0.75]])


def test_specialisation_matches_hand_computed_mutual_information():
  perfect = analysis.specialisation(np.array([[2.0, 0.0], [0.0, 2.0]]))
  assert math.isclose(perfect["mutual_information"], math.log(2), rel_tol=1e-12)
  assert math.isclose(perfect["normalized_mi"], 1.0, rel_tol=1e-12)
  assert math.isclose(perfect["expert_entropy_per_class"], 0.0, abs_tol=1e-12)
  blind = analysis.specialisation(np.full((3, 4), 5.0))
  assert blind["normalized_mi"] == pytest.approx(0.0, abs=1e-12)
  assert blind["expert_entropy_per_class"] == pytest.approx(1.0)
  # P(c, e) = [[3, 1], [1, 3]] / 8: MI = sum p log(p / (p_c p_e)) with p_c = p_e = 1/2.
  partial = analysis.specialisation(np.array([[3.0, 1.0], [1.0, 3.0]]))
  mi = 2 * 3 / 8 * math.log(1.5) + 2 * 1 / 8 * math.log(0.5)
  assert math.isclose(partial["mutual_information"], mi, rel_tol=1e-12)
  assert math.isclose(partial["normalized_mi"], mi / math.log(2), rel_tol=1e-12)


def test_layer_report_recommends_class_blind_layers_for_dense():
  report = analysis.layer_report(
      {"blocks/2/mlp": np.full((2, 2), 1.0), "blocks/3/mlp": np.array([[4.0, 0.0], [0.0, 4.0]])},
      {"blocks/2/mlp": {"load": np.array([0.5, 0.5]), "dropped_fraction": np.float32(0.25)},
       "blocks/3/mlp": {"load": np.array([0.75, 0.25])}}, threshold=0.1)
  assert report["recommend_dense"] == ["blocks/2/mlp"]
  assert report["layers"]["blocks/2/mlp"]["dropped_fraction"] == 0.25
  assert report["layers"]["blocks/3/mlp"]["load_cv"] == pytest.approx(0.5)
  json.dumps(report)  # plain JSON types only


def test_token_expert_mass_for_each_plan_kind():
  token_choice = RoutingPlan(kind="token_choice", num_experts=3,
                             expert_index=jnp.array([[[0, 2], [1, 1]]]),
                             combine_weights=jnp.ones((1, 2, 2)))
  np.testing.assert_allclose(token_choice.token_expert_mass(2), [[[0.5, 0, 0.5], [0, 1, 0]]])
  expert_choice = RoutingPlan(kind="expert_choice", num_experts=2,
                              token_index=jnp.array([[[0, 2], [0, 1]]]),
                              combine_weights=jnp.ones((1, 2, 2)))
  np.testing.assert_allclose(expert_choice.token_expert_mass(3), [[[1, 1], [0, 1], [1, 0]]])
  weights = jnp.array([[[[0.1, 0.2], [0.3, 0.4]]]])  # [G=1, S=1, E=2, P=2]
  soft = RoutingPlan(kind="soft", num_experts=2, combine_weights=weights)
  np.testing.assert_allclose(soft.token_expert_mass(1), [[[0.3, 0.7]]], rtol=1e-6)


def test_primary_expert_for_each_plan_kind():
  token_choice = RoutingPlan(kind="token_choice", num_experts=3,
                             expert_index=jnp.array([[[0, 2], [1, 0]]]),
                             combine_weights=jnp.ones((1, 2, 2)))
  np.testing.assert_array_equal(token_choice.primary_expert(2), [[0, 1]])
  # Expert 0 took tokens 0, 2 (weights 0.2, 0.9), expert 1 took 0, 1 (0.7, 0.4); token 3: none.
  expert_choice = RoutingPlan(kind="expert_choice", num_experts=2,
                              token_index=jnp.array([[[0, 2], [0, 1]]]),
                              combine_weights=jnp.array([[[0.2, 0.9], [0.7, 0.4]]]))
  np.testing.assert_array_equal(expert_choice.primary_expert(4), [[1, 1, 0, 2]])
  soft = RoutingPlan(kind="soft", num_experts=2,
                     combine_weights=jnp.array([[[[0.1, 0.2], [0.3, 0.4]]]]))
  np.testing.assert_array_equal(soft.primary_expert(1), [[1]])


def test_expert_choice_specialisation_is_measured_on_tokens_not_example_mass():
  """Expert choice, one group per image, E=2, S=4 tokens, capacity factor 2: C = 4, every expert
  takes every token, so each image's routing mass is [4, 4] whatever its class: the
  example-mass MI is 0 by construction. Class 0 tokens point at expert 0 (W = I), class 1 at
  expert 1: every token's main expert is its class, token-level normalised MI = 1."""
  c = moe.default_config("expert_choice")
  c.num_experts, c.hidden_dim, c.capacity_factor = 2, 4, 2.0
  layer = moe.MoELayer(2, c, rngs=nnx.Rngs(0))
  layer.eval()
  layer.router.kernel[...] = jnp.eye(2)
  direction = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # labels 0, 0, 1, 1
  x = direction[:, None] * jnp.arange(1.0, 5.0)[None, :, None]  # [B=4, T=4, D=2]
  _, aux = moe.capture_aux(layer)(x)
  (a,) = aux.layers.values()
  classes = np.eye(2)[[0, 0, 1, 1]]
  np.testing.assert_allclose(classes.T @ a.example_tokens, [[8, 0, 0], [0, 8, 0]])
  report = analysis.layer_report({"ec": classes.T @ a.example_load}, {"ec": a.metrics},
                                 class_token_expert={"ec": classes.T @ a.example_tokens})
  layer_report = report["layers"]["ec"]
  assert layer_report["example_normalized_mi"] == pytest.approx(0.0, abs=1e-12)
  assert layer_report["normalized_mi"] == pytest.approx(1.0)
  assert report["recommend_dense"] == []


def test_report_keeps_router_load_before_capacity_next_to_kept_load():
  report = analysis.layer_report(
      {"l": np.eye(2)}, {"l": {"load": np.array([0.75, 0.25]), "kept_load": np.array([0.5, 0.5])}})
  layer = report["layers"]["l"]
  assert layer["load"] == [0.75, 0.25] and layer["load_cv"] == pytest.approx(0.5)
  assert layer["kept_load"] == [0.5, 0.5] and layer["kept_load_cv"] == 0.0


def assert_real_png(path: str, width: int, height: int) -> None:
  image = matplotlib.image.imread(path)
  assert image.shape[:2] == (height, width), image.shape
  rgb = image[..., :3]
  assert rgb.std() > 0.05 and (rgb < 0.5).mean() > 0.005  # drawn content, not a blank canvas


def test_plots_are_images_of_the_expected_size(tmp_path):
  rng = np.random.default_rng(0)
  matrices = {f"blocks/{i}/mlp": rng.random((10, 4)) for i in (2, 3)}
  metrics = {k: {"load": rng.dirichlet(np.ones(4))} for k in matrices}
  paths = plots.plot_report(analysis.layer_report(matrices, metrics), str(tmp_path))
  sizes = {"heatmaps.png": (512, 272), "load.png": (512, 224), "specialisation.png": (360, 240)}
  assert sorted(os.path.basename(p) for p in paths) == sorted(sizes)
  for path in paths:
    assert_real_png(path, *sizes[os.path.basename(path)])


@pytest.mark.slow  # end-to-end, minutes: `-m slow`
def test_quick_comparison_writes_table_json_and_plot(tmp_path):
  config = common.load_config(QUICK)
  config.only = "dense,top2"
  config.total_steps, config.log_every_steps = 4, 2
  config.batch_size, config.evals.test.batch_size = 64, 200
  config.evals.test.split = "test[:200]"
  config.data.data_dir = str(tmp_path / "tfds")
  rows = compare.compare_all(config, str(tmp_path))
  assert [r["strategy"] for r in rows] == ["dense", "top2"]
  dense, top2 = rows
  assert dense["dropped_fraction"] is None and dense["specialisation"] is None
  assert 0 <= top2["dropped_fraction"] <= 1 and top2["router_entropy"] > 0
  assert top2["mflops_per_token"] > dense["mflops_per_token"] > 0  # routed + shared experts
  assert all(r["step"] == 4 and 0 <= r["accuracy"] <= 1 and r["step_ms"] > 0 for r in rows)
  saved = json.load(open(tmp_path / "compare.json"))
  assert saved["rows"] == json.loads(json.dumps(rows))
  assert saved["table"].splitlines()[0].startswith("| strategy | test acc")
  assert len(saved["table"].splitlines()) == 4
  assert_real_png(str(tmp_path / "compare.png"), 720, 256)
  # Rebuilding the table from the finished runs alone (as after one job per strategy).
  config.train = False
  assert compare.compare_all(config, str(tmp_path)) == rows


def test_analysis_command_replots_an_eval_file(tmp_path):
  rng = np.random.default_rng(1)
  matrices = {"blocks/3/mlp": rng.random((10, 4))}
  report = analysis.layer_report(matrices, {"blocks/3/mlp": {"load": np.full(4, 0.25)}})
  (tmp_path / "eval_test.json").write_text(json.dumps({"step": 1, "routing": report}))
  proc = subprocess.run([sys.executable, "-m", "moe_jax.commands.analysis",
                         str(tmp_path / "eval_test.json"),
                         "--out", str(tmp_path / "plots")], capture_output=True, text=True,
                        timeout=120, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr
  assert sorted(os.listdir(tmp_path / "plots")) == ["heatmaps.png", "load.png",
                                                    "specialisation.png"]
  assert "blocks/3/mlp" in proc.stdout


def test_unknown_strategy_is_an_error_naming_the_choices():
  config = common.load_config(QUICK)
  config.only = "top2,no_such_router"
  with pytest.raises(ValueError, match=r"config.only=.*name strategies from \[.*'top2'"):
    compare.strategy_names(config)
  assert compare.strategy_names(common.load_config("configs/compare_routers.py")) == list(compare_routers.ORDER)


def write_run(folder, strategy: str, seed: int | None, accuracy: float, spec: tuple[float, ...],
              recommend: tuple[str, ...] = ()) -> None:
  """A finished run folder by hand: strategy.json, eval_test.json (one layer per `spec` value, none
  for dense) and metrics.jsonl (steps/s 10 and 20: median step 66.7 ms)."""
  os.makedirs(folder)
  info = {"strategy": strategy, "flops_per_token": 2e5}
  if seed is not None:
    info["seed"] = seed
  json.dump(info, open(os.path.join(folder, "strategy.json"), "w"))
  layers = {f"blocks/{i}/mlp": {"normalized_mi": s, "load_cv": 0.1, "router_entropy": 1.0,
                                "dropped_fraction": 0.0} for i, s in enumerate(spec)}
  json.dump({"test/accuracy": accuracy, "test/loss": 1 - accuracy, "step": 8,
             "routing": {"layers": layers, "recommend_dense": list(recommend)}},
            open(os.path.join(folder, "eval_test.json"), "w"))
  with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
    f.write("\n".join(json.dumps({"train/steps_per_sec": r}) for r in (10.0, 20.0)) + "\n")


def test_rows_aggregate_seeds_as_mean_and_std_from_finished_run_folders(tmp_path):
  for seed, acc, spec in ((0, 0.90, (0.1, 0.3)), (1, 0.92, (0.2, 0.5)), (2, 0.94, (0.3, 0.7))):
    write_run(tmp_path / "top1" / f"seed{seed}", "top1", seed, acc, spec,
              ("blocks/0/mlp",) if seed < 2 else ("blocks/0/mlp", "blocks/1/mlp"))
  write_run(tmp_path / "dense", "dense", None, 0.80, ())  # a run written before seeds
  os.makedirs(tmp_path / "top2" / "seed0")  # unfinished: no files yet
  config = common.load_config(QUICK)
  config.train, config.per_layer, config.only = False, True, "dense,top1"
  rows = compare.compare_all(config, str(tmp_path))
  assert [(r["strategy"], r["seeds"]) for r in rows] == [("dense", 1), ("top1", 3)]
  dense, top1 = rows
  assert top1["seed_list"] == [0, 1, 2] and dense["seed_list"] == [None]
  assert top1["accuracy"] == pytest.approx(0.92) and top1["accuracy_std"] == pytest.approx(0.02)
  assert top1["loss_std"] == pytest.approx(0.02) and dense["accuracy_std"] is None
  assert top1["specialisation"] == pytest.approx(0.35)  # mean over layers, then over seeds
  assert top1["specialisation_std"] == pytest.approx(0.15)
  assert top1["layer_specialisation"] == pytest.approx({"blocks/0/mlp": 0.2, "blocks/1/mlp": 0.5})
  assert top1["layer_specialisation_std"]["blocks/1/mlp"] == pytest.approx(0.2)
  assert top1["recommend_dense"] == ["blocks/0/mlp"]  # recommended by every seed
  assert top1["step_ms"] == pytest.approx(1e3 / 15) and dense["specialisation"] is None
  saved = json.load(open(tmp_path / "compare.json"))
  lines = saved["table"].splitlines()
  assert lines[0].endswith("| specialisation | seeds |")
  assert lines[2] == "| dense | 0.8000 | 0.2000 | 66.7 | 0.200 | - | - | - | - | 1 |"
  assert lines[3].startswith("| top1 | 0.9200 ± 0.0200 | 0.0800 ± 0.0200 | 66.7 |")
  assert lines[3].endswith("| 0.350 ± 0.150 | 3 |")
  assert saved["layer_table"].splitlines() == [
      "| strategy | block 0 spec. | block 1 spec. |", "|---|---|---|",
      "| dense | - | - |", "| top1 | 0.200 ± 0.100 | 0.500 ± 0.200 |"]


def test_expert_axis_expands_moe_strategies_and_seeds_name_run_folders():
  config = common.load_config(QUICK)
  config.only, config.num_experts = "dense,top2,soft", "8,32"
  models = compare.strategy_models(config)
  assert list(models) == ["dense", "top2_E8", "top2_E32", "soft_E8", "soft_E32"]
  assert [m.moe.num_experts for n, m in models.items() if n != "dense"] == [8, 32, 8, 32]
  assert config.strategies.top2.moe.num_experts == 4  # the strategy node itself is untouched
  config.num_experts = ""
  assert list(compare.strategy_models(config)) == ["dense", "top2", "soft"]
  config.seeds = " 2, 0 ,1"
  assert compare.seed_list(config) == [2, 0, 1]
  assert compare.run_dir("/w", "top2_E8", 1) == os.path.join("/w", "top2_E8", "seed1")


@pytest.mark.parametrize("field,value", [("seeds", "0,x"), ("seeds", "1,1"), ("seeds", ""),
                                         ("seeds", "-1"), ("num_experts", "0,8"),
                                         ("num_experts", "8.5")])
def test_bad_seeds_or_expert_counts_are_errors_naming_the_field(field, value):
  config = common.load_config(QUICK)
  config[field] = value
  parse = compare.seed_list if field == "seeds" else compare.strategy_models
  with pytest.raises(ValueError, match=rf"^config\.{field}="):
    parse(config)
