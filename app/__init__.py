"""The qlora-service API process and the `qlora` command. Never imports torch at import time."""
