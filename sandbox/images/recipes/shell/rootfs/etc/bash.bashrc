# /etc/bash.bashrc of the Layercake lesson shell: every interactive bash reads it (a login shell through
# /etc/profile). The home holds no rc file of its own: in a sandbox it is an empty directory in memory.

case $- in
    *i*) ;;
    *) return ;;
esac

HISTCONTROL=ignoreboth
HISTSIZE=1000
shopt -s histappend checkwinsize

# Green user@host, blue directory: the prompt stands out from the output of the commands around it.
PS1='\[\e[1;32m\]\u@\h\[\e[0m\]:\[\e[1;34m\]\w\[\e[0m\]\$ '

alias ls='ls --color=auto'
alias ll='ls -l'
alias la='ls -A'
alias grep='grep --color=auto'
