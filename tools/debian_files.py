#!/usr/bin/env python3
"""Write the files of the Debian package that are derived from the plugin's
own flag table, so that they cannot drift from it:

    python3 tools/debian_files.py manpage DATE   # isolcpu-plugin(8), groff, on stdout
    python3 tools/debian_files.py defaults       # /etc/default/isolcpu-plugin, every line commented

Used by tools/build-deb.sh; needs the standard library only.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import isolcpu_plugin as plugin          # noqa: E402

# Switches select what one run does; a service must leave them unset.
MODES = ("--list", "--json", "--probe", "--doctor")


def roff(text):
    """Text safe in a man page: backslashes escaped, hyphens as \\- in
    option-like words, no line starting with a control character."""
    text = text.replace("\\", "\\e")
    words = [w.replace("-", "\\-") if w.startswith("-") or w.startswith("ISOLCPU") else w for w in text.split(" ")]
    text = " ".join(words)
    return "\\&" + text if text[:1] in ".'" else text


def manpage(date):
    parser = plugin.build_parser()
    lines = [
        '.TH ISOLCPU\\-PLUGIN 8 "%s" "isolcpu-plugin %s" "System Administration"' % (date, plugin.__version__),
        ".SH NAME",
        "isolcpu-plugin \\- Kubernetes device plugin offering a node's isolated CPUs",
        ".SH SYNOPSIS",
        ".B isolcpu\\-plugin",
        "[\\fIOPTION\\fR]...",
        ".br",
        ".B isolcpu\\-plugin \\-\\-list",
        "[\\fB\\-\\-json\\fR] [\\fIOPTION\\fR]...",
        ".br",
        ".B isolcpu\\-plugin \\-\\-doctor",
        "[\\fB\\-\\-json\\fR] [\\fIOPTION\\fR]...",
        ".br",
        ".B isolcpu\\-plugin \\-\\-probe",
        "[\\fIOPTION\\fR]...",
        ".SH DESCRIPTION",
        roff(parser.description),
        ".PP",
        roff("Without a mode it serves the plugin until SIGTERM or SIGINT; SIGHUP re-reads the host. "
             "It is started by isolcpu-plugin.service (alias isolcpu_plugin.service, the name of the plugin "
             "it replaces), which reads /etc/default/isolcpu-plugin."),
        ".SH OPTIONS",
    ]
    for flag, default, text in plugin.VALUE_OPTIONS:
        lines += [".TP", "\\fB%s\\fR \\fI%s\\fR" % (roff(flag), flag[2:].upper().replace("-", "_")),
                  roff("%s (default: %s; environment: %s)" % (text, default if default is not None else "unset",
                                                             plugin.env_twin(flag)))]
    for flag, text in plugin.SWITCH_OPTIONS:
        lines += [".TP", "\\fB%s\\fR" % roff(flag), roff("%s (environment: %s)" % (text, plugin.env_twin(flag)))]
    lines += [".TP", "\\fB\\-\\-version\\fR", "print the version, with python's, grpcio's and protobuf's, and exit",
              ".SH ENVIRONMENT",
              roff("Every option has an environment twin ISOLCPU_<OPTION> (--resource-name is "
                   "ISOLCPU_RESOURCE_NAME); an option given on the command line wins. An empty or blank variable "
                   "counts as unset. Switches take 1/0, true/false or yes/no."),
              ".SH FILES",
              ".TP", "/etc/default/isolcpu-plugin", "settings for the service, as ISOLCPU_<OPTION>=value lines",
              ".TP", "/var/lib/kubelet/device-plugins/windriver.com-isolcpus.sock", "the socket the plugin serves",
              ".TP", "/var/lib/kubelet/pod-resources/kubelet.sock",
              "the kubelet's PodResources socket, asked who holds each CPU",
              ".SH EXIT STATUS",
              roff("0 after SIGTERM or SIGINT, or when --probe's plugin answers or no --doctor check fails; 1 when "
                   "--probe's plugin does not answer or a --doctor check fails; 2 for bad configuration or "
                   "unreadable input, with one line on stderr."),
              ".SH SEE ALSO",
              ".BR systemctl (1),",
              ".BR kubelet (8)",
              ""]
    return "\n".join(lines)


def defaults():
    lines = ["# Settings for isolcpu-plugin, read by isolcpu-plugin.service. One line per",
             "# option: ISOLCPU_<OPTION>=value; a blank or commented line leaves the default.",
             "# See isolcpu-plugin(8). SIGHUP (systemctl reload isolcpu-plugin) re-reads",
             "# the host; a change here takes a restart (systemctl restart isolcpu-plugin).",
             "#"]
    for flag, default, text in plugin.VALUE_OPTIONS:
        lines += ["# %s; default %s" % (text, default if default is not None else "unset"),
                  "#%s=%s" % (plugin.env_twin(flag), default if default is not None else "")]
    lines.append("#")
    lines.append("# Modes of a single run, not of the service: leave them unset here.")
    for flag, text in plugin.SWITCH_OPTIONS:
        lines += ["# %s" % text, "#%s=" % plugin.env_twin(flag)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    what = sys.argv[1:2]
    if what == ["manpage"] and len(sys.argv) == 3:
        sys.stdout.write(manpage(sys.argv[2]))
    elif what == ["defaults"]:
        sys.stdout.write(defaults())
    else:
        sys.exit("usage: debian_files.py manpage DATE | defaults")
