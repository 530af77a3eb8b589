# Set-up and everyday commands. Every target builds its own virtual environment from the checkout.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= edge,train,test
comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: test demo venv clean bench results

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

# pytest's exit code 5 (no tests collected) is a failure here, not a pass.
test: $(STAMP)
	$(PY) -m pytest -q -rs; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(VENV)/bin/hematovision-edge count samples/bccd/BCCD/JPEGImages --report out/demo
	@echo "reports written to out/demo"

clean:
	rm -rf $(VENV) out build *.egg-info
