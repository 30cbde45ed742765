#!/usr/bin/env python3
from bootstrap.cli import main

main()
