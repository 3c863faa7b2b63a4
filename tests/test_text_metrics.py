"""Text metrics on hand-made inputs with hand-computed answers, and the offline encoder."""

import math

import numpy as np
import pytest

from gfn_jax.text_metrics import (
    bleu4,
    distinct_n,
    embedding_diversity,
    gleu,
    load_sentence_encoder,
)

HYP = "the cat sat on the mat"
REF = "the cat is on the mat"


def test_bleu4_known_values():
    assert bleu4([HYP], [HYP]) == pytest.approx(1.0)
    assert bleu4(["a b c d"], "w x y z") == 0.0  # no shared unigram
    # By hand: clipped n-gram precisions 5/6, 3/5, 1/4, 0/3 (smoothed to 0.1/3); no brevity
    # penalty (equal lengths).
    want = (5 / 6 * 3 / 5 * 1 / 4 * (0.1 / 3)) ** 0.25
    assert bleu4([HYP], [REF]) == pytest.approx(want, rel=1e-12)
    # Brevity penalty alone: every n-gram matches, 4 hypothesis vs 6 reference words.
    assert bleu4(["a b c d"], ["a b c d e f"]) == pytest.approx(math.exp(1 - 6 / 4), rel=1e-12)
    # Several references: the exact one makes it 1; per-hypothesis scores and their mean.
    assert bleu4([HYP], [[REF, HYP]]) == pytest.approx(1.0)
    per = bleu4([HYP, HYP, "a b c d"], REF, reduce=False)
    np.testing.assert_allclose(per, [want, want, 0.0], rtol=1e-12)
    assert bleu4([HYP, HYP, "a b c d"], REF) == pytest.approx(2 * want / 3, rel=1e-12)


def test_gleu_known_values():
    assert gleu([HYP], [HYP]) == pytest.approx(1.0)
    assert gleu(["a b c d"], ["w x y z"]) == 0.0
    # By hand: 5+3+1+0 = 9 matching 1..4-grams of 6+5+4+3 = 18 in each: min(9/18, 9/18).
    assert gleu([HYP], [REF]) == pytest.approx(0.5, rel=1e-12)
    # 6 of the hypothesis' 6 n-grams match, of the reference's 14: min(1, 6/14).
    assert gleu(["a b c"], ["a b c d e"]) == pytest.approx(3 / 7, rel=1e-12)
    np.testing.assert_allclose(gleu([HYP, "a b c"], [REF, "a b c d e"], reduce=False),
                               [0.5, 3 / 7], rtol=1e-12)


def test_reference_shapes_are_checked():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu4([HYP, HYP], [REF])
    with pytest.raises(TypeError):
        gleu(HYP, REF)


def test_distinct_n_by_hand():
    texts = ["a b a b", "a b c"]
    # unigrams a b a b a b c: 3 distinct of 7; bigrams ab ba ab | ab bc: 3 distinct of 5.
    assert distinct_n(texts, 1) == pytest.approx(3 / 7)
    assert distinct_n(texts, 2) == pytest.approx(3 / 5)
    # trigrams aba bab | abc: all distinct.
    assert distinct_n(texts, 3) == pytest.approx(1.0)
    assert distinct_n(["a", ""], 2) == 0.0
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_embedding_diversity_by_hand():
    vecs = {"x": [2.0, 0.0], "y": [0.0, 3.0], "-x": [-1.0, 0.0]}
    enc = lambda texts: np.array([vecs[t] for t in texts])
    # group 1: cos(x, y) = 0 -> 1; group 2: cos 1, -1, -1 -> 1 - (-1/3) = 4/3.
    assert embedding_diversity([["x", "y"], ["x", "x", "-x"]], enc) == pytest.approx(7 / 6)
    with pytest.raises(ValueError, match="at least 2"):
        embedding_diversity([["x"]], enc)


@pytest.fixture(scope="module")
def encoder():
    return load_sentence_encoder()


SENTS = [
    "The stock market fell sharply after the announcement.",
    "My grandmother grows tomatoes in her garden.",
    "The spacecraft entered orbit around Jupiter.",
    "He forgot his umbrella and got soaked in the rain.",
]
PARAPHRASES = [
    "The cat is sleeping on the sofa.",
    "A cat sleeps on the couch.",
    "On the sofa, the cat is asleep.",
]


def test_offline_encoder_and_diversity(encoder):
    e = encoder(SENTS)
    assert e.shape == (len(SENTS), 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    # Batching does not change the vectors.
    np.testing.assert_allclose(encoder(SENTS[2:3])[0], e[2], atol=1e-5)
    # Diversity from an independent pairwise cosine loop on the encoder's own vectors.
    groups = [SENTS, PARAPHRASES]
    want = []
    for g in groups:
        v = np.asarray(encoder(g), np.float64)
        cos = [v[i] @ v[j] / np.linalg.norm(v[i]) / np.linalg.norm(v[j])
               for i in range(len(g)) for j in range(i + 1, len(g))]
        want.append(1 - np.mean(cos))
    assert embedding_diversity(groups, encoder) == pytest.approx(np.mean(want), abs=1e-6)
    same = embedding_diversity([[SENTS[0]] * 3], encoder)
    para = embedding_diversity([PARAPHRASES], encoder)
    unrelated = embedding_diversity([SENTS], encoder)
    assert abs(same) < 1e-5
    assert para < 0.5 < unrelated, (para, unrelated)


def test_encoder_matches_sentence_transformers(encoder):
    # The same checkpoint through sentence-transformers' own pipeline (a dependency of the
    # weights package): our mean pooling + normalisation must give the same vectors.
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(encoder.path, device="cpu").encode(SENTS)
    np.testing.assert_allclose(encoder(SENTS), ref, atol=1e-5)


def test_unknown_encoder_name_raises():
    with pytest.raises(ValueError, match="nothing is downloaded"):
        load_sentence_encoder("some-org/not-packaged")
