# /etc/bash.bashrc of the Layercake workstation: every interactive bash reads it (a login shell through
# /etc/profile). The home holds no rc file of its own: in a sandbox it is an empty directory in memory.

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

# Leaving the login shell ends the sandbox and removes all that was made in it, and an exit too many is an easy
# slip after leaving a container's shell: the first exit (or Ctrl-D) only says so, and an exit right after it
# leaves.
if shopt -q login_shell; then
    IGNOREEOF=1
    _layercake_prompts=0
    _layercake_exit_at=-2
    PROMPT_COMMAND="_layercake_prompts=\$((_layercake_prompts + 1))${PROMPT_COMMAND:+; $PROMPT_COMMAND}"
    exit() {
        # A subshell's exit, as in $(...) or ( ... ), leaves only the subshell.
        if [ "$BASH_SUBSHELL" -gt 0 ] || [ "$_layercake_exit_at" -eq $((_layercake_prompts - 1)) ]; then
            builtin exit "$@"
        fi
        _layercake_exit_at=$_layercake_prompts
        echo "This is your workstation's shell: leaving it ends your sandbox, and its containers, images and" >&2
        echo "volumes are removed. Type exit again to leave." >&2
    }
fi

# The welcome, once per login: a shell started from this one does not repeat it.
if shopt -q login_shell && [ -r /etc/motd ]; then
    cat /etc/motd
fi
