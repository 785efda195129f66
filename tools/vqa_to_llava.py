"""Writes the LLaVA-format eval file of a VQAv2 split with the 10 annotators' answers
(`moe_jax.vlm.llava_data.vqa_examples`), for a generate evaluation scored by the VQA accuracy
(`configs/mocha_paper.py`'s `evals.vqav2_val`):

    python tools/vqa_to_llava.py --questions v2_OpenEnded_mscoco_val2014_questions.json \\
        --annotations v2_mscoco_val2014_annotations.json --image_folder coco/val2014 \\
        --out ./playground/data/eval/vqav2/llava_vqav2_val_answers.json
"""
import argparse
import json
import pathlib

from moe_jax.vlm import llava_data


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--questions", required=True, help="the official questions JSON")
  parser.add_argument("--annotations", required=True, help="the official annotations JSON")
  parser.add_argument("--image_folder", required=True,
                      help="the COCO images' folder relative to data.image_dir")
  parser.add_argument("--out", required=True, help="the LLaVA-format JSON to write (new)")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  if out.exists():
    raise SystemExit(f"--out={args.out} exists; remove it or choose another path")
  examples = llava_data.vqa_examples(json.loads(pathlib.Path(args.questions).read_text()),
                                     json.loads(pathlib.Path(args.annotations).read_text()),
                                     args.image_folder)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(examples))
  print(f"wrote {out}: {len(examples)} questions")


if __name__ == "__main__":
  main()
