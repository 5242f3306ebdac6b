"""The sans-IO heart of tether: the domain model, the task state machine, the
scheduling and escalation policies, and the domain errors. Imports stdlib only."""
