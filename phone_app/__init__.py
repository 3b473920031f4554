"""A phone-app emulator: keeps a device key, registers it with the wallet, shows QR codes and NFC tokens.

See phone_app/README.md. `python -m phone_app --help` for the CLI; `phone_app.device.Phone`
for the library the CLI, the demo and the tests use.
"""
