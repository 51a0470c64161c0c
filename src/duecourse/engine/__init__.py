"""The execution engine (SPEC §4): eligibility, enqueueing, the queue, dispatch rules, outcomes, scheduler."""
