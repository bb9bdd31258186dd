"""Test infrastructure shared by tests/ and bench/.

- ``dbserver``: one MongoDB-wire-protocol server (MONGODB_URI, mongod,
  Docker's mongo:7 or FerretDB) behind one fixture;
- ``brokerproc``: a real broker subprocess with its config and log;
- ``netconns``: counting and sampling TCP connections to the database;
- ``process``: spawning, waiting for and stopping helper processes;
- ``toxiproxy``: network faults between the broker and the database;
- ``fleet`` and ``worker``: many short-lived worker processes.

bench/ holds the workloads, modes and report built on top of these.
"""
