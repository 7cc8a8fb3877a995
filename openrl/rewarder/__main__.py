"""`python -m openrl.rewarder <name> worker <module:fn>`: one reward worker process (see child.py)."""

from openrl.rewarder.child import main

main()
