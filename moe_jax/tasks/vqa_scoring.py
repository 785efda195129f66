"""Scoring generated answers as text: VQA's answer normalisation and the 10-annotator VQA accuracy.

Both are ports of the code the MoCHA reference scores with (Pbhgit/MoCHA
`llava/eval/m4c_evaluator.py`: `EvalAIAnswerProcessor`, copied there from MMF, and
`TextVQAAccuracyEvaluator`; LLaVA's VQAv2 submissions go through the same processor), quirks
included, so that our numbers are the reference's:
- `normalize_answer`: lower case; "," and "?" deleted and "'s" split off as " 's" (its
  `word_tokenize`, which the official VQA eval lacks); newlines and tabs to spaces; the
  punctuation of `PUNCTUATIONS` deleted when any of it touches a space (or a comma sits between
  digits), else replaced by a space; periods deleted unless a digit follows (the official regex
  `(?!<=\\d)(\\.)(?!\\d)`, whose `(?!<=` is a lookahead, so "5." loses its period and ".5" keeps
  it; at most 32 of them: both pass `re.UNICODE` (= 32) as `re.sub`'s count); number words zero
  to ten (and "none") as digits; articles dropped; missing apostrophes of contractions restored
  ("dont" -> "don't").
- `vqa_accuracy(prediction, answers)`: the mean over the 10 leave-one-annotator-out subsets of
  `min(#annotators in the subset who gave the prediction / 3, 1)`, all answers normalised. So 1
  of 10 matching scores 0.3, 2 score 0.6, 3 score 0.9 and 4 or more 1.0. As the reference
  (`assert len(answers) == 10`), it needs the 10 annotators' answers.
The official VQA evaluation (`vqaEval.py`, EvalAI's VQAv2 server) differs in two details the
reference's code does not have: no `word_tokenize` step, and the ground-truth answers only get
the punctuation step, and only when the 10 disagree. Where they disagree, we follow the
reference (its TextVQA numbers are computed this way; its VQAv2 numbers come from the server).
"""
from __future__ import annotations

import re
from typing import Sequence

NUM_ANNOTATORS = 10
MATCHES_FOR_FULL_CREDIT = 3
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATIONS = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
MAX_PERIODS_STRIPPED = 32  # the reference's `re.sub(..., re.UNICODE)`: count = re.UNICODE = 32
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've"}


def _punctuation(text: str) -> str:
  """The reference's `process_punctuation` (the test of each mark reads the original text)."""
  out = text
  comma_between_digits = COMMA_STRIP.search(text) is not None
  for p in PUNCTUATIONS:
    touches_space = p + " " in text or " " + p in text
    out = out.replace(p, "" if touches_space or comma_between_digits else " ")
  return PERIOD_STRIP.sub("", out, count=MAX_PERIODS_STRIPPED)


def _digits_articles_contractions(text: str) -> str:
  """The reference's `process_digit_article`."""
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
  """`text` as the reference's `EvalAIAnswerProcessor` leaves it (module docstring)."""
  text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = text.replace("\n", " ").replace("\t", " ").strip()
  return _digits_articles_contractions(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """The VQA accuracy of `prediction` against the 10 annotators' `answers` (module docstring;
  ValueError unless there are exactly 10)."""
  if len(answers) != NUM_ANNOTATORS:
    raise ValueError(f"the VQA accuracy needs the {NUM_ANNOTATORS} annotators' answers, got "
                     f"{len(answers)}")
  predicted = normalize_answer(prediction)
  matches = sum(normalize_answer(a) == predicted for a in answers)
  # leaving out a matching annotator leaves matches - 1 in the subset, any other leaves matches
  per_subset = [min((matches - left_out) / MATCHES_FOR_FULL_CREDIT, 1.0)
                for left_out in [1] * matches + [0] * (NUM_ANNOTATORS - matches)]
  return sum(per_subset) / NUM_ANNOTATORS
