"""First-letter absorption with known answers: on a planted parent/child hierarchy whose child
latents absorb the parent for a fraction r of the tokens, the measured rate is r; the
per-token formula on hand-made numbers; the task's tokens."""

import numpy as np
import pytest
from conftest import relu_sae

from sae_jax.analysis.absorption import (
    LETTERS,
    absorption,
    first_letter,
    letter_rows,
    token_absorption,
)


def planted(r: float, seed: int = 0, tokens_per_letter: int = 40, repeats: int = 4):
    """Rows x = parent(letter) + child(token) + noise for letters a, b, c, and a ReLU SAE
    that reconstructs them exactly: one parent latent per letter, one child latent per token;
    for a fraction r of each letter's tokens the child latent's decoder row carries the
    parent direction too and the parent latent is silent (absorbed).

    Returns:
      `(sae, x, letters, test mask, absorbed mask over rows)`.
    """
    rng = np.random.default_rng(seed)
    n_letters = 3
    n_tokens = n_letters * tokens_per_letter
    d = n_letters + n_tokens + 5
    basis = np.linalg.qr(rng.standard_normal((d, d)))[0]
    parent, child = basis[:n_letters], basis[n_letters:n_letters + n_tokens]
    token_letter = np.repeat(np.arange(n_letters), tokens_per_letter)
    absorbed = np.zeros(n_tokens, bool)
    for c in range(n_letters):
        mine = np.flatnonzero(token_letter == c)
        absorbed[rng.choice(mine, int(round(r * len(mine))), replace=False)] = True
    w_enc = np.zeros((d, n_letters + n_tokens))
    w_dec = np.zeros((n_letters + n_tokens, d))
    for c in range(n_letters):
        w_enc[:, c] = 2 * (parent[c] - child[absorbed & (token_letter == c)].sum(0))
        w_dec[c] = parent[c]
    for t in range(n_tokens):
        w_enc[:, n_letters + t] = 2 * child[t]
        w_dec[n_letters + t] = child[t] + (parent[token_letter[t]] if absorbed[t] else 0)
    sae = relu_sae(w_enc, -np.ones(n_letters + n_tokens), w_dec)
    token = np.repeat(np.arange(n_tokens), repeats)
    x = parent[token_letter[token]] + child[token] + 0.05 * rng.standard_normal((len(token), d))
    test_tokens = rng.choice(n_tokens, int(0.3 * n_tokens), replace=False)
    return sae, x.astype(np.float32), token_letter[token], np.isin(token, test_tokens), \
        absorbed[token]


@pytest.mark.parametrize("r", [0.0, 0.25, 0.5])
def test_planted_absorption_rate_is_measured(r):
    sae, x, letters, test, absorbed = planted(r)
    result = absorption(sae, x, letters, test)
    scored = result["letters"]
    assert sorted(scored) == ["a", "b", "c"]
    realized = []
    for c, letter in enumerate("abc"):
        e = scored[letter]
        assert e["probe_f1"] > 0.95 and e["main_latents"] == [c]  # the parent latent
        assert e["n_probe_true_positives"] == e["n_test_tokens"]
        rows = test & (letters == c)
        realized.append(absorbed[rows].mean())
        assert e["absorption_rate"] == pytest.approx(realized[-1], abs=1e-9)
        assert e["absorption_full_rate"] == pytest.approx(realized[-1], abs=1e-9)
    assert result["absorption_rate"] == pytest.approx(np.mean(realized), abs=1e-9)
    assert result["absorption_full_rate"] == pytest.approx(np.mean(realized), abs=1e-9)
    assert abs(result["absorption_rate"] - r) < 0.12  # the test tokens are a sample


def test_per_token_formula_on_hand_made_numbers():
    # latents: 0 main, 1 and 2 aligned absorbers, 3 unaligned (cos < 0.1)
    cos = np.array([1.0, 0.5, 0.2, 0.05])
    w_proj = np.array([1.0, 0.5, 0.2, 0.05])
    f = np.array([[0.3, 1.0, 0.0, 4.0],    # partial: M=0.3, A=0.5 -> 0.5 / 0.8
                  [0.0, 1.6, 0.0, 0.0],    # full: main silent, absorber 0.8 >= 0.4
                  [0.0, 0.2, 0.5, 0.0],    # A = 0.2 < 0.4: none
                  [1.2, 1.0, 0.0, 0.0],    # M >= a: none
                  [0.0, 1.6, 0.0, 0.0]])   # the activation projects negatively: none
    a = np.array([1.0, 1.0, 1.0, 1.0, -1.0])
    fraction, full = token_absorption(a, f, w_proj, cos, [0])
    np.testing.assert_allclose(fraction, [0.625, 1.0, 0.0, 0.0, 0.0])
    assert full.tolist() == [False, True, False, False, False]


def test_the_task_takes_word_initial_alphabetic_tokens(tokenizer):
    assert [first_letter(t) for t in ["apple", "Ġbanana", "▁Cat", "##ing", "x2", "(", "", None,
                                      "é"]] == [0, 1, 2, -1, -1, -1, -1, -1, -1]
    words = ["apple", "banana", "##s", "(", "apple", "apple", "cherry"]
    ids = np.array([tokenizer.token_to_id(w) for w in words] + [tokenizer.token_to_id("apple")] * 3)
    rows, letters, test = letter_rows(ids, tokenizer, per_token=2, seed=0, test_fraction=0.34)
    assert (ids[rows] == tokenizer.token_to_id("apple")).sum() == 2  # at most 2 per token
    assert sorted(LETTERS[c] for c in letters) == ["a", "a", "b", "c"]
    assert len(set(ids[rows][test])) == 1  # one of the three tokens held out, all its rows
