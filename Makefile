# CityTap's front door. `make help` lists the targets; the README's two commands are
# `make demo` (the demo city, end to end) and `make test` (what CI runs).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
PY := .venv/bin/python

.PHONY: help bootstrap provision proto proto-check up down status demo test test-unit reset bench-transfers bench-taps bench-tap-floor bench-settlement bench-face

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

bootstrap: ## Create .venv and install the Python packages (fast when up to date).
	@bash scripts/bootstrap.sh

provision: ## Install what the stack needs: apt packages, Kafka jars, stripe-mock.
	@bash infra/provision.sh

proto: bootstrap ## Regenerate gen/ from proto/.
	@bash scripts/gen_proto.sh

proto-check: bootstrap ## Fail when gen/ is stale against proto/.
	@bash scripts/check_proto.sh

up: bootstrap ## Start Kafka, PostgreSQL, Redis, stripe-mock and the five services (dev stack).
	@bash infra/components.sh up
	@bash infra/services.sh up

down: ## Stop everything `make up` started.
	@bash infra/services.sh down
	@bash infra/components.sh down

status: ## Show each component and service with its address and health.
	@bash infra/components.sh status
	@bash infra/services.sh status

demo: up ## The main job: bring the stack up and run the demo city end to end.
	@echo; echo "== components"; bash infra/components.sh status
	@source infra/env.sh && $(PY) -m scripts.demo

test: ## Install and start everything the tests need, run every tier, stop it all again.
	@bash scripts/test.sh

test-unit: bootstrap ## Only the unit tier (no I/O, seconds).
	@$(PY) -m pytest tests/unit -q

reset: ## Stop the dev stack and delete its data (keeps downloaded jars and binaries).
	@bash infra/services.sh down
	@bash infra/components.sh reset

bench-taps: up ## Tap latency at 200 taps/s and the highest sustained rate, open loop (BENCH_QUICK=1: 10 s steps).
	@source infra/env.sh && $(PY) -m loadtests.taps

bench-tap-floor: up ## The floor of a tap on this stack: the same taps through two rule-free servers, at 100-500 taps/s (FLOOR_ARGS=--one-hop: one service).
	@source infra/env.sh && $(PY) -m loadtests.tap_floor $(FLOOR_ARGS)

bench-transfers: up ## Benchmark posted transfers/s through the wallet's gRPC API against pgbench (dev stack).
	@source infra/env.sh && $(PY) -m loadtests.wallet_transfers

bench-settlement: up ## Close a service day of 1M transactions (lines loaded in bulk) and print the time and rate.
	@source infra/env.sh && $(PY) -m loadtests.settlement_close

bench-face: bootstrap ## 1:N face match p50/p99 and recall@1 over 100k and 1M templates, and the face tap (BENCH_QUICK=1: 100k only).
	@bash infra/components.sh up
	@bash scripts/fetch_test_data.sh
	@source infra/env.sh && $(PY) -m loadtests.face_match
