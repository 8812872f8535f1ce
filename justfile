# trio-swap developer commands. `just` is optional: each recipe is a plain shell line.

venv := ".venv"
python := venv + "/bin/python"

# create the virtual environment with everything needed for development
setup:
    python3 -m venv {{venv}}
    {{venv}}/bin/pip install -e '.[dev]'

# serve the built-in demo (or pass args: just serve --config config.yaml)
serve *args: setup
    {{venv}}/bin/trio-swap serve {{args}}

# the default test run (what CI runs)
test *args: setup
    {{python}} -m pytest {{args}}

# real llama-server lane: builds llama-server once (about 8 min on 2 cores, cached after), then runs against it
test-real *args:
    python3 -m venv {{venv}}
    {{venv}}/bin/pip install -e '.[real]'
    {{python}} -m pytest -n 0 -m real tests/real {{args}}

# browser lane: the web UI in headless Chromium (Debian's: apt-get install chromium; no `playwright install`)
test-browser *args:
    python3 -m venv {{venv}}
    {{venv}}/bin/pip install -e '.[browser]'
    {{python}} -m pytest -n 0 -m browser tests/browser {{args}}

# gateway lane: a real LiteLLM proxy in front of two trio-swap nodes (docs/scaling.md; the extra is about 750 MB)
test-gateway *args:
    python3 -m venv {{venv}}
    {{venv}}/bin/pip install -e '.[gateway]'
    {{python}} -m pytest -n 0 -m gateway tests/gateway {{args}}

# lint, format check and type check
lint: setup
    {{venv}}/bin/ruff check src tests bench
    {{venv}}/bin/ruff format --check src tests bench
    {{venv}}/bin/mypy

# apply the formatter and safe lint fixes
fmt: setup
    {{venv}}/bin/ruff format src tests bench
    {{venv}}/bin/ruff check --fix src tests bench

# benchmarks against the responder called directly (see docs/benchmarks.md)
bench *args: setup
    {{python}} bench/run.py {{args}}

# fit by memory vs one at a time vs by count over a replayed trace (see docs/benchmarks.md)
bench-churn *args: setup
    {{python}} bench/churn.py {{args}}
