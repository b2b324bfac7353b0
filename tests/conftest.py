import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network: every model is built locally
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from click.testing import CliRunner


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A complete world built once per session with `spo world build --tiny` (the real CLI path)."""
    from spo.cli import cli

    out = tmp_path_factory.mktemp("world")
    result = CliRunner().invoke(cli, ["world", "build", "--tiny", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out
