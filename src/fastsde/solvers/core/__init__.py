"""The solver core: context, stepper contract, controllers, correctors, the driver loop and the
helpers several methods share. Below every method module; it never imports one."""
