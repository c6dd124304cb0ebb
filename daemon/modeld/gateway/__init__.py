"""`modeld gateway`: an OpenAI-compatible HTTP front door that routes through modeld.

A separate, optional process and a modeld client like any other: for each request it
Routes the body's `model`, forwards the request to the leased replica, streams the
answer back as it arrives, and Releases the lease with the outcome. Inference bytes
pass through the gateway, never through the daemon.

Modules: `config` (the `[gateway]` table), `app` (the aiohttp application and its
routes), `proxy` (one request's lease, forward, relay and retry), `upstream` (the
HTTP client to replicas), `leasing` (Route, Release and renewals), `errors`
(modeld's statuses as OpenAI-style error JSON), `auth` (bearer keys), `metrics`.
"""
