"""The gate emulator: a command-line gate that calls the fare API (`python -m services.fare_gate.emulator`).

Single taps, GetGateConfig and QuoteFare; scenarios of riders moving through stations; and
an open-loop load mode that measures latency from each tap's scheduled send time and draws
a histogram. See services/fare_gate/EMULATOR.md.
"""
