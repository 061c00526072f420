"""The CI webhook receiver: signed deliveries in, runs of the `release` deployment out.

signature.py  HMAC-SHA256 over the raw body (GitHub's and Gantry's header)
mapping.py    payloads (generic, GitHub `release` / `workflow_run`) → a ReleaseSpec
store.py      delivery id → flow run, durably (SQLite), so a redelivery never starts
              a second run
app.py        the ASGI app (`gantry webhook serve`)
"""
