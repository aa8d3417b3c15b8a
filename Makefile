# Mailwarden. On a fresh Debian machine: `make run` or `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := var
DEMO_DOMAIN := example.test
DEMO_PASSWORD := demo password for testing

.PHONY: run test bench lint format deps venv demo clean

# System packages the tests and the benchmark drive as real peers.
deps:
	@missing=""; \
	command -v smtp-source >/dev/null || missing="$$missing postfix"; \
	command -v swaks >/dev/null || missing="$$missing swaks"; \
	command -v opendkim >/dev/null || missing="$$missing opendkim"; \
	command -v fail2ban-regex >/dev/null || missing="$$missing fail2ban"; \
	command -v nft >/dev/null || missing="$$missing nftables"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v zip >/dev/null || missing="$$missing zip"; \
	command -v rspamd >/dev/null || missing="$$missing rspamd"; \
	command -v spamd >/dev/null || missing="$$missing spamassassin spamd"; \
	command -v spamc >/dev/null || missing="$$missing spamc"; \
	command -v spamass-milter >/dev/null || missing="$$missing spamass-milter"; \
	command -v clamd >/dev/null || missing="$$missing clamav-daemon"; \
	command -v sigtool >/dev/null || missing="$$missing clamav"; \
	command -v clamav-milter >/dev/null || missing="$$missing clamav-milter"; \
	test -e /usr/share/clamav-testfiles/clam.exe || missing="$$missing clamav-testfiles"; \
	command -v mbsync >/dev/null || missing="$$missing isync"; \
	command -v fetchmail >/dev/null || missing="$$missing fetchmail"; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then echo "please install:$$missing (apt-get install$$missing)"; exit 1; fi; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing ca-certificates >/dev/null; \
	fi

$(BIN)/mailwarden: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $@

venv: $(BIN)/mailwarden

# A demo instance under ./var for example.test with two users, then every listener.
$(DEMO)/mailwarden.toml: | $(BIN)/mailwarden
	$(BIN)/mailwarden --dir $(DEMO) init --domain $(DEMO_DOMAIN) --dev
	printf '%s\n' '$(DEMO_PASSWORD)' | $(BIN)/mailwarden --dir $(DEMO) user add alice@$(DEMO_DOMAIN) --password-stdin
	printf '%s\n' '$(DEMO_PASSWORD)' | $(BIN)/mailwarden --dir $(DEMO) user add bob@$(DEMO_DOMAIN) --password-stdin
	@echo "Demo users: alice@$(DEMO_DOMAIN) and bob@$(DEMO_DOMAIN), password '$(DEMO_PASSWORD)'"

demo: $(DEMO)/mailwarden.toml

run: deps venv demo
	$(BIN)/mailwarden --dir $(DEMO) serve

test: deps venv
	$(BIN)/pytest -q

bench: deps venv
	$(BIN)/python bench/smtp_accept --sessions 1,10,50 --messages 2000

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache .ruff_cache .hypothesis
