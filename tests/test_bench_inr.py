"""bench.inr's --merge: seeds of several runs pooled case by case, errors on overlaps."""
import json
import statistics

import pytest

from bench import inr


def _inr_case(seed_psnrs: dict[int, float], method: str = "moec", lr: float = 1e-3) -> dict:
  runs = [{"seed": s, "psnr": p, "ssim": 0.5, "ratio_actual": 200.0, "file_bytes": 2900,
           "lr": lr, "compress_s": 1.0, "encode_s": 1.0, "decode_s": 0.5,
           "trials": [{"lr": lr, "psnr": p}]} for s, p in seed_psnrs.items()]
  return {"volume": "v.nii", "method": method, "ratio_target": 200.0, "budget_bytes": 2949,
          "steps": 2000, "runs": runs, **inr._summary(runs)}


def test_merge_pools_seeds_and_resummarises():
  codec = {"volume": "v.nii", "method": "spline", "ratio_target": 200.0, "budget_bytes": 2949,
           "runs": [{"psnr": 26.0, "file_bytes": 2800}], "psnr": 26.0, "psnr_std": 0.0}
  too_small = {"volume": "v.nii", "method": "single", "ratio_target": 200.0,
               "budget_bytes": 2949, "steps": 2000, "note": "the budget leaves no room"}
  merged = inr.merge({
      "a.json": {"records": [_inr_case({0: 29.0}), codec, too_small]},
      "b.json": {"records": [_inr_case({1: 30.0, 2: 31.5}), codec,
                             _inr_case({1: 28.0}, method="single")]}})
  by_method = {r["method"]: r for r in merged}
  assert [r["method"] for r in merged] == ["moec", "spline", "single"]
  moec = by_method["moec"]
  assert [r["seed"] for r in moec["runs"]] == [0, 1, 2]
  assert moec["psnr"] == pytest.approx((29.0 + 30.0 + 31.5) / 3)
  assert moec["psnr_std"] == pytest.approx(statistics.stdev([29.0, 30.0, 31.5]))
  assert len(by_method["spline"]["runs"]) == 1
  assert by_method["single"]["psnr"] == 28.0 and "note" not in by_method["single"]


def test_merge_keeps_the_best_learning_rate_trial_of_a_seed():
  merged = inr.merge({"a.json": {"records": [_inr_case({0: 29.0, 1: 28.0}, lr=1e-3)]},
                      "b.json": {"records": [_inr_case({0: 30.0}, lr=3e-4)]},
                      "c.json": {"records": [_inr_case({0: 27.0}, lr=3e-3)]}})
  (case,) = merged
  seed0 = case["runs"][0]
  assert seed0["lr"] == 3e-4 and seed0["psnr"] == 30.0
  assert [(t["lr"], t["psnr"]) for t in seed0["trials"]] == [(1e-3, 29.0), (3e-4, 30.0),
                                                             (3e-3, 27.0)]
  assert case["psnr"] == pytest.approx(29.0)  # seeds 0 (its best trial) and 1


def test_merge_refuses_a_seed_and_lr_twice_and_disagreeing_codec_runs():
  with pytest.raises(SystemExit, match=r"seed 1 .* at lr 0.001 .*merge disjoint seeds"):
    inr.merge({"a.json": {"records": [_inr_case({0: 29.0, 1: 30.0})]},
               "b.json": {"records": [_inr_case({1: 30.0})]}})
  codec = {"volume": "v.nii", "method": "jpeg2000", "ratio_target": 200.0, "budget_bytes": 2949}
  with pytest.raises(SystemExit, match="classical codecs are deterministic"):
    inr.merge({"a.json": {"records": [{**codec, "runs": [{"file_bytes": 2900}]}]},
               "b.json": {"records": [{**codec, "runs": [{"file_bytes": 2901}]}]}})


def test_merge_reads_seeds_of_files_written_before_runs_kept_them():
  old = _inr_case({0: 29.0, 1: 30.0})
  old["runs"] = [{k: v for k, v in run.items() if k != "seed"} for run in old["runs"]]
  (case,) = inr.merge({"old.json": {"seeds": 2, "records": [old]},
                       "new.json": {"records": [_inr_case({2: 31.0})]}})
  assert [r["seed"] for r in case["runs"]] == [0, 1, 2]
  with pytest.raises(SystemExit, match="names no seed"):
    inr.merge({"old.json": {"seeds": 3, "records": [old]}})


def test_unreadable_or_foreign_merge_inputs_are_one_line_errors(tmp_path):
  missing, broken, foreign = tmp_path / "no.json", tmp_path / "cut.json", tmp_path / "gmm.json"
  broken.write_text('{"bench": "inr", "records": [')
  foreign.write_text(json.dumps({"bench": "gmm", "records": []}))
  for path, match in ((missing, "cannot read .*no.json"), (broken, "cannot read .*cut.json"),
                      (foreign, "not a bench.inr JSON .*'gmm'")):
    with pytest.raises(SystemExit, match=match):
      inr.read_documents([str(path)])
  good = tmp_path / "ok.json"
  good.write_text(json.dumps({"bench": "inr", "records": []}))
  assert inr.read_documents([str(good)]) == {str(good): {"bench": "inr", "records": []}}
