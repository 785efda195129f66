"""VQA answer normalisation and the 10-annotator accuracy (`moe_jax.tasks.vqa_scoring`)."""
import numpy as np
import pytest

from moe_jax.tasks.vqa_scoring import normalize_answer, vqa_accuracy


@pytest.mark.parametrize("raw, normalised", [
    # the official VQA evaluation page's examples (visualqa.org/evaluation.html)
    ("Yes", "yes"),                      # lower case
    ("It is 5.", "it is 5"),             # a period removed ...
    ("1.5 meters", "1.5 meters"),        # ... except a decimal point
    ("two dogs", "2 dogs"),              # number words to digits
    ("A dog on the bed", "dog on bed"),  # articles removed
    ("dont", "don't"),                   # the missing apostrophe of a contraction
    ("red/white", "red white"),          # punctuation to a space ...
    ("2:50 pm", "2:50 pm"),              # ... except colons (and apostrophes)
    ("100,978", "100978"),               # no space for a comma between digits
    # the reference's own (m4c EvalAIAnswerProcessor) details
    ("girl's", "girl 's"),               # word_tokenize splits off 's
    ("What? No!", "what no"),            # "?" deleted; "!" touching nothing becomes a space
    ("yes - no", "yes no"),              # a mark touching a space is deleted
    (".5 inch.", ".5 inch"),             # the period before a digit stays
    ("Ten\tNone\n", "10 0"),             # tabs, newlines; "none" is 0
])
def test_normalisation_as_the_official_eval_and_the_reference(raw, normalised):
  assert normalize_answer(raw) == normalised


def _reference_scores(answers: list[str]) -> dict[str, float]:
  """A literal port of the reference's `TextVQAAccuracyEvaluator._compute_answer_scores`."""
  answers = [normalize_answer(a) for a in answers]
  assert len(answers) == 10
  gt_answers = list(enumerate(answers))
  scores = {}
  for unique_answer in set(answers):
    accs = []
    for gt_answer in gt_answers:
      other_answers = [item for item in gt_answers if item != gt_answer]
      matching_answers = [item for item in other_answers if item[1] == unique_answer]
      accs.append(min(1, float(len(matching_answers)) / 3))
    scores[unique_answer] = sum(accs) / len(accs)
  return scores


def test_accuracy_averages_the_ten_leave_one_out_subsets():
  # k of 10 annotators gave the prediction: leaving one of them out leaves k - 1 matches (1 of
  # the 10 subsets each), leaving another out leaves k (10 - k subsets); each scores min(m/3, 1)
  # k=1: (1*0 + 9*1/3)/10 = 0.3; k=2: (2*1/3 + 8*2/3)/10 = 0.6; k=3: (3*2/3 + 7*1)/10 = 0.9;
  # k=4: (4*1 + 6*1)/10 = 1.0
  for k, expected in [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)]:
    answers = ["Two"] * k + ["three"] * (10 - k)
    assert vqa_accuracy("2.", answers) == pytest.approx(expected, abs=1e-12), k
  # against the reference's loop on random answer lists with repeats, and every prediction
  rng = np.random.default_rng(0)
  words = ["yes", "no", "two", "2", "a cat", "cat", "cats"]
  for _ in range(20):
    answers = list(rng.choice(words, 10))
    reference = _reference_scores(answers)
    for prediction in words + ["dog"]:
      assert vqa_accuracy(prediction, answers) == pytest.approx(
          reference.get(normalize_answer(prediction), 0.0), abs=1e-12)
  with pytest.raises(ValueError, match="needs the 10 annotators' answers, got 3"):
    vqa_accuracy("yes", ["yes"] * 3)
