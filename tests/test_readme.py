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
    assert namespace["reads"].shape == (4, 200, 32)
