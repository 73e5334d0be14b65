"""Steering generation: clamp one SAE feature inside a causal LM and show what it then says.

The feature is clamped with its error term kept (`intervene.clamp_feature`: h' = h + (v −
f_i(h)) · W_dec[i] / input_scale, so only feature i changes) at the SAE's layer and site, at
every **steered position**: the prompt's tokens except BOS (unless the store kept special
tokens) and every generated token, so the clamp holds while the model writes. Positions
after the one being predicted are steered too, but attention is causal, so they change
nothing.

For each prompt (BOS first when the model has one, as harvest builds its sequences):

* `text_before` / `ids_before`: the unsteered continuation (`model.generate`, no hook);
* `text_after` / `ids_after`: the steered continuation;
* `logits_rose` / `logits_fell`: at the first generated position, the `top` tokens whose
  logit rose / fell most under the clamp (`{"token", "id", "change"}`), and `kl` =
  KL(clean ‖ steered) of the next-token distributions there, in nats;
* `random`: the control, one entry per random direction of W_dec[i]'s norm
  (`intervene.random_directions`), pushed at the same positions by the amounts v − f_i(h)
  the clamp would add to that row's stream (on the prompt: exactly the clamp's): its
  continuation, logit changes and KL. A feature that steers should change what the model says
  more, or more coherently, than a push of the same size in a random direction;
* `activation_before` / `activation_after`: the mean of f_i over the prompt's steered
  positions in the clean stream, and as the SAE reads the clamped stream back (the hook sits
  at the SAE's own layer, so the prompt's stream there does not depend on the clamp).

Greedy by default; `temperature > 0` samples (seeded), so the before and after texts then
differ by chance as well as by the clamp. The feature and the random rows run as one batch
through one compiled hook (`push_hook`), so the control costs little.
"""

from __future__ import annotations

import numpy as np

from sae_jax.analysis.catalog import feature_label
from sae_jax.analysis.intervene import (
    activation_before_after,
    add_direction,
    feature_activation,
    feature_direction,
    random_directions,
)
from sae_jax.errors import UserError
from sae_jax.lm.hooks import check_not_transcoder

MAX_NEW_TOKENS = 24
TOP_LOGITS = 10
N_RANDOM = 4


def check_feature(sae, feature: int) -> None:
    """Refuses a feature id the SAE does not have."""
    if not 0 <= feature < sae.width:
        raise UserError(f"feature {feature} is out of range: the SAE has {sae.width} features "
                        f"(0..{sae.width - 1})")


def push_hook(h, sae, feature, value, directions, start):
    """The generation hook: row j of `h (B, T, d)` (j < len(directions)) gets
    `directions[j]` added with the amounts v − f_feature(h) that clamp the feature to
    `value`, at positions ≥ `start`; further rows (the batch padding a sharded model adds)
    are left alone. With directions[j] = W_dec[feature] / input_scale this is
    `clamp_feature`. Module-level so that the model's compiled function is cached by it;
    every argument after `h` is traced."""
    import jax.numpy as jnp

    b, t, d = h.shape
    rows = jnp.zeros((b, d), jnp.float32).at[:directions.shape[0]].set(directions)
    mask = jnp.broadcast_to(jnp.arange(t)[None, :] >= start, (b, t))
    return add_direction(h, rows[:, None, :], value - feature_activation(sae, h, feature),
                         mask)


def prompt_ids(model, prompt: str, bos: bool | None = None) -> tuple[np.ndarray, int]:
    """The prompt's ids `(1, T)`, BOS (when `bos`, default: when the model has one) then its
    tokens, as harvest frames a document; and how many special tokens lead (0 or 1)."""
    bos_id = model.specials.cls
    bos = bos_id is not None if bos is None else bool(bos)
    if bos and bos_id is None:
        raise UserError("the store's sequences start with BOS, but the model names none")
    ids = ([bos_id] if bos else []) + list(model.tokenizer.encode(
        prompt, add_special_tokens=False).ids)
    if not ids:
        raise UserError(f"the prompt {prompt!r} has no tokens")
    return np.asarray([ids], np.int32), int(bos)


def decode_token(tokenizer, i: int) -> str:
    """One token as text (special tokens shown by name); a token that is only part of a
    character (one byte of UTF-8) is shown as its vocabulary entry, e.g. `<0xE2>`."""
    text = tokenizer.decode([int(i)], skip_special_tokens=False)
    if text and "\ufffd" not in text:
        return text
    return tokenizer.id_to_token(int(i)) or f"<{int(i)}>"


def logit_changes(tokenizer, clean: np.ndarray, steered: np.ndarray, top: int) -> dict:
    """The `top` tokens whose logit rose and fell most from `clean` to `steered` (vocab,),
    and KL(clean ‖ steered) of the next-token distributions, in nats."""
    change = steered.astype(np.float64) - clean
    order = np.argsort(-change, kind="stable")

    def rows(ids):
        return [{"token": decode_token(tokenizer, i), "id": int(i),
                 "change": float(change[i])} for i in ids]

    p, q = _log_softmax(clean), _log_softmax(steered)
    kl = max(0.0, float(np.sum(np.exp(p) * (p - q))))  # >= 0 but for rounding
    return {"kl": kl, "logits_rose": rows(order[:top]), "logits_fell": rows(order[::-1][:top])}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def steer_generation(sae, model, prompts, feature: int, value: float, *, layer: int,
                     site: str = "resid", max_new_tokens: int = MAX_NEW_TOKENS,
                     temperature: float = 0.0, seed: int = 0, n_random: int = N_RANDOM,
                     top: int = TOP_LOGITS, keep_special: bool = False,
                     bos: bool | None = None) -> dict:
    """Generates from each prompt with and without `feature` clamped to `value` at `layer`'s
    `site` (see the module docstring for every number).

    Args:
      sae: a trained SAE (`sae_jax.load`) on that site's activations (not a transcoder).
      model: any hookable causal LM with `tokenizer` (a `tokenizers.Tokenizer`), `specials`
        (`.cls` = BOS id or None), `generate(ids, n, temperature=, seed=, hook=,
        hook_args=)` and `logits(ids, hook=, hook_args=)`, where `hook=(layer, site, fn)`
        calls `fn(value, *hook_args)`: `lm.causal.CausalLM`; with `activations(ids, layer,
        site)` too, the activation before/after is reported.
      prompts: a prompt or a list of them.
      feature, value: the feature id and the value it is clamped to.
      layer, site: where the SAE reads (the store's `layer` and `site`).
      max_new_tokens: tokens generated per prompt.
      temperature, seed: 0 is greedy; above 0 samples with this seed.
      n_random: random same-norm directions for the control (0: none).
      top: tokens listed in `logits_rose` / `logits_fell`.
      keep_special: steer BOS too (a store harvested with `keep_special`).
      bos: start prompts with BOS (default: when the model has one).

    Returns:
      A JSON-friendly dict: the settings, `kl` and `random_kl` (means over prompts), and
      `prompts`, one dict per prompt.
    """
    import jax.numpy as jnp

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise UserError("give at least one prompt to steer")
    check_not_transcoder(sae.config, "steering")
    check_feature(sae, feature)
    if max_new_tokens < 1 or n_random < 0 or top < 1 or temperature < 0:
        raise UserError("max_new_tokens and top must be at least 1, n_random and temperature "
                        "at least 0")
    direction = feature_direction(sae, feature)
    dirs = np.concatenate([np.asarray(direction)[None],
                           random_directions(direction, n_random, seed)])
    m = len(dirs)
    per_prompt = []
    for prompt in prompts:
        ids, n_special = prompt_ids(model, prompt, bos)
        start = 0 if keep_special else n_special
        hook = (layer, site, push_hook)
        args = (sae, jnp.int32(feature), jnp.float32(value), jnp.asarray(dirs),
                jnp.int32(start))
        t0 = ids.shape[1]
        before = model.generate(ids, max_new_tokens, temperature=temperature, seed=seed)
        after = model.generate(np.repeat(ids, m, 0), max_new_tokens, temperature=temperature,
                               seed=seed, hook=hook, hook_args=args)
        # The first position's logits, read off the generated buffers: attention is causal,
        # so the tokens after the prompt do not reach them, and the shapes (so the compiled
        # functions) are those generate just used.
        clean = np.asarray(model.logits(before))[0, t0 - 1]
        steered = np.asarray(model.logits(after, hook=hook, hook_args=args))[:, t0 - 1]
        row = {"prompt": prompt, "n_prompt_tokens": t0, "n_steered": t0 - start,
               **_activations(sae, model, ids, layer, site, start, feature, value),
               **_continuation(model.tokenizer, before[0, t0:], "before"),
               **_continuation(model.tokenizer, after[0, t0:], "after"),
               **logit_changes(model.tokenizer, clean, steered[0], top)}
        row["random"] = [{**_continuation(model.tokenizer, after[j, t0:]),
                          **logit_changes(model.tokenizer, clean, steered[j], top)}
                         for j in range(1, m)]
        row["random_kl"] = float(np.mean([r["kl"] for r in row["random"]])) \
            if n_random else None
        per_prompt.append(row)
    return {"feature": int(feature), "layer": int(layer), "site": site, "value": float(value),
            "max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
            "seed": int(seed), "n_random": int(n_random), "n_prompts": len(prompts),
            "kl": float(np.mean([r["kl"] for r in per_prompt])),
            "random_kl": (float(np.mean([r["random_kl"] for r in per_prompt]))
                          if n_random else None),
            "prompts": per_prompt}


def generate_run(run, prompts, feature: int, value: float, times: float | None,
                 entry: dict, **settings) -> dict:
    """`sae-jax steer` on a causal-LM run (`runs.ModelRun`): `steer_generation` at the store's
    layer and site, BOS and special tokens as the store has them, with the catalog `entry`
    that gave `value` (times × its max activation) named in the result."""
    result = steer_generation(run.sae, run.model, prompts, feature, value, layer=run.layer,
                              site=run.site, keep_special=run.keep_special,
                              bos=run.store.meta.get("bos"), **settings)
    return {"run": str(run.run_dir), "model": run.store.meta.get("model"),
            "times": None if times is None else float(times),
            "max_activation": float(entry.get("max_activation", 0.0)),
            "label": feature_label(entry), **result}


def _continuation(tokenizer, ids: np.ndarray, when: str | None = None) -> dict:
    """`{"text_<when>", "ids_<when>"}` (or `{"text", "ids"}`) of generated ids."""
    suffix = f"_{when}" if when else ""
    ids = [int(i) for i in ids]
    return {f"text{suffix}": tokenizer.decode(ids), f"ids{suffix}": ids}


def _activations(sae, model, ids, layer, site, start, feature, value) -> dict:
    """Mean f_feature over the prompt's steered positions, clean and read back after the
    clamp (None when the model cannot hand out activations or nothing is steered)."""
    import jax.numpy as jnp

    if not hasattr(model, "activations") or ids.shape[1] <= start:
        return {"activation_before": None, "activation_after": None}
    h = jnp.asarray(model.activations(ids, layer, site))
    mask = jnp.arange(ids.shape[1])[None, :] >= start
    total = ids.shape[1] - start
    before, after = activation_before_after(sae, h, mask, jnp.float32(value),
                                            jnp.int32(feature))
    return {"activation_before": float(before[0]) / total,
            "activation_after": float(after[0]) / total}


def format_generation(r: dict) -> str:
    """A readable before/after summary of a `steer_generation` result."""
    def tokens(rows, n=5):
        return ", ".join(f"{x['token']!r} {x['change']:+.3g}" for x in rows[:n])

    how = (f"{r['times']:g} x max activation {r['max_activation']:.4g}"
           if r.get("times") is not None else "given value")
    lines = [f"feature {r['feature']}" + (f" ({r['label']})" if r.get("label") else "")
             + f" clamped to {r['value']:.4g} ({how}) at layer {r['layer']} {r['site']}, "
             + ("greedy" if not r["temperature"] else f"temperature {r['temperature']:g}")]
    for i, p in enumerate(r["prompts"], 1):
        act = ("" if p["activation_before"] is None else
               f", activation {p['activation_before']:.3g} -> {p['activation_after']:.3g}")
        lines += [f"[{i}] {p['prompt']!r} ({p['n_steered']} prompt tokens steered{act})",
                  f"    before: {p['text_before']!r}",
                  f"    after:  {p['text_after']!r}",
                  f"    first token, KL {p['kl']:.4g}: rose {tokens(p['logits_rose'])}",
                  f"                 fell {tokens(p['logits_fell'])}"]
        for j, c in enumerate(p["random"], 1):
            lines += [f"    random {j}: {c['text']!r}",
                      f"              KL {c['kl']:.4g}: rose {tokens(c['logits_rose'], 3)}"]
    return "\n".join(lines)
