
#compdef bd3

_bd3_completion() {
  eval $(env _TYPER_COMPLETE_ARGS="${words[1,$CURRENT]}" _BD3_COMPLETE=complete_zsh bd3)
}

compdef _bd3_completion bd3

