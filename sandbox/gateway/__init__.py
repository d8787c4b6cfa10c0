"""The per-student Docker API gateway: one unix socket per sandbox session, speaking the Engine API and
forwarding to the shared engine under the policy in `policy.py`."""
