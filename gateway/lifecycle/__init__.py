"""How the gateway runs as processes: the supervisor that holds the listening sockets and
starts generations of workers (``supervisor``), a worker's side of it (``worker``), the
messages between them (``channel``) and the sockets themselves (``listeners``)."""
