from marketplace_ws.cli import main

main()
