"""The README's quickstart runs as written."""
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    namespace = {}
    exec(compile(blocks[0], "README quickstart", "exec"), namespace)  # noqa: S102
    assert namespace["out"].shape == (1024, 128)
    assert namespace["long_interest"].shape == (256, 128)
    assert namespace["item_emb"].weight.grad.is_sparse      # rows of the table only
    assert namespace["reads"].shape == (4, 200, 32)


def test_models_and_serving_examples_run(tmp_path, monkeypatch):
    """The training and serving examples (every python block after the quickstart) run in
    order, in one namespace, as a reader would paste them."""
    monkeypatch.chdir(tmp_path)                    # the serving example writes uic.db
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace = {}
    for i, block in enumerate(blocks[1:], 1):
        exec(compile(block, f"README block {i}", "exec"), namespace)  # noqa: S102
    assert namespace["logits"].shape == (1000,)
    assert (tmp_path / "uic.db").exists()
    assert namespace["served"].embeddings.shape == (3, 2, 96)
    assert not namespace["served"].cold.any()           # refreshed before the second get
