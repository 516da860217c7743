//! Starts a real Patroni + PostgreSQL cluster on loopback for the end-to-end tests.
