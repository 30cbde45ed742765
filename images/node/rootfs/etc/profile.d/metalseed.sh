# metalseed: no core dumps from login shells
ulimit -c 0
