"""Opening a run for steer/features/audit: everything comes from the run and its store, and
each wrong combination is one clear error."""

import dataclasses
import json
import shutil

import pytest
from test_steer import tiny_minilm_run  # noqa: E402

from sae_jax.analysis.runs import open_model_run  # noqa: E402
from sae_jax.data.store import META_FILE  # noqa: E402
from sae_jax.errors import UserError  # noqa: E402
from sae_jax.rundir import RunInfo, read_run, write_run  # noqa: E402


def test_open_model_run(tmp_path_factory, tmp_path, synthetic_store):
    store, run = tiny_minilm_run(tmp_path_factory)
    opened = open_model_run(run, "features")
    assert (opened.layer, opened.keep_special, opened.run_dir) == (3, False, str(run))
    assert opened.sae.width == 64 and opened.store.d_in == 384
    assert opened.model.tokenizer is not None
    assert open_model_run(run, "features", layer=3).layer == 3
    with pytest.raises(UserError, match="--layer 5 does not match the run: its SAE reads "
                                        "layer 3"):
        open_model_run(run, "features", layer=5)
    # Another store of the same tokens, but of layer 2: not what this SAE reads.
    layer2 = tmp_path / "layer2"
    shutil.copytree(store, layer2)
    meta = json.loads((layer2 / META_FILE).read_text())
    (layer2 / META_FILE).write_text(json.dumps({**meta, "layer": 2}))
    with pytest.raises(UserError, match="holds layer 2, but the run was trained on layer 3"):
        open_model_run(run, "audit", data_dir=layer2)
    with pytest.raises(UserError, match="audit runs all-MiniLM-L6-v2, but store .* holds "
                                        "activations of None; use your own model"):
        open_model_run(run, "audit", data_dir=synthetic_store, hint="use your own model")
    info = read_run(run)
    transcoder = tmp_path / "transcoder"
    shutil.copytree(run, transcoder)
    write_run(transcoder, dataclasses.replace(
        info, config=dataclasses.replace(info.config, transcoder=True)))
    with pytest.raises(UserError, match="steer needs an SAE on the residual stream"):
        open_model_run(transcoder, "steer")
    with pytest.raises(UserError, match="no run at"):
        open_model_run(tmp_path / "nothing", "steer")
    wider = tmp_path / "wider"
    write_run(wider, RunInfo(info.config, 385, 1.0, str(store)))
    with pytest.raises(UserError, match="has d_in=384, but the SAE in .* expects d_in=385"):
        open_model_run(wider, "steer")
