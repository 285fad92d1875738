"""The daemon and what serves it: the loop (daemon), the control socket
(control), the policy directory watcher (watch), sd_notify (notify) and the
release of start-up memory (memory)."""
