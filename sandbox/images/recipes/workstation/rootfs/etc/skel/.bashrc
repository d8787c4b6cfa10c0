# ~/.bashrc of the Layercake workstation.

case $- in
    *i*) ;;
    *) return ;;
esac

HISTCONTROL=ignoreboth
HISTSIZE=1000
shopt -s histappend checkwinsize

# Magenta user@workstation, blue directory: a shell here is told apart at a glance from one inside a
# container started from here.
PS1='\[\e[1;35m\]\u@workstation\[\e[0m\]:\[\e[1;34m\]\w\[\e[0m\]\$ '

alias ls='ls --color=auto'
alias ll='ls -l'
alias la='ls -A'
alias grep='grep --color=auto'

if ! shopt -oq posix && [ -f /usr/share/bash-completion/bash_completion ]; then
    . /usr/share/bash-completion/bash_completion
fi

# The welcome, once per login: a shell started from this one does not repeat it.
if shopt -q login_shell && [ -r /etc/motd ]; then
    cat /etc/motd
fi
