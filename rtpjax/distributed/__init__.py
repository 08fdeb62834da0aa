"""The engine among several processes: the engine process and the typed messages that cross process boundaries."""
