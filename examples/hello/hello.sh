#!/bin/sh
# The example's entrypoint: one line naming the environment and the working directory it was given.
echo "$GREETING, $1 (cwd $(pwd)): $(cat /etc/motd)"
